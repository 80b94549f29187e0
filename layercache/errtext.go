package layercache

import (
	"fmt"
	"net"
	"reflect"
	"strings"
)

// stableText is err's text with the parts of network errors that change
// from one attempt to the next replaced: the local address and port of a
// connection ("read tcp 10.0.0.5:41234->10.0.0.9:443" reads "read tcp
// 10.0.0.9:443"), and a failed DNS lookup's resolver socket ("lookup h on
// 10.96.0.10:53: read udp 10.0.0.5:53124->10.96.0.10:53: i/o timeout"
// reads "DNS lookup of h failed: i/o timeout"). Events repeat only when
// their text does: this text lets Kubernetes count retries of a failing
// pull as one event.
func stableText(err error) string {
	msg := err.Error()
	walkErrors(err, func(e error) {
		switch e := e.(type) {
		case *net.DNSError:
			msg = strings.ReplaceAll(msg, e.Error(), dnsText(e))
		case *net.OpError:
			if e.Source != nil && e.Err != nil {
				stable := e.Op + " " + e.Net
				if e.Addr != nil {
					stable += " " + e.Addr.String()
				}
				msg = strings.ReplaceAll(msg, e.Error(), stable+": "+e.Err.Error())
			}
		}
	})
	return msg
}

// dnsText describes a failed lookup by its name and outcome.
func dnsText(e *net.DNSError) string {
	text := "DNS lookup of " + e.Name + " failed"
	switch {
	case e.IsNotFound:
		return text + ": no such host"
	case e.IsTimeout:
		return text + ": timed out"
	}
	// The cause's last part: "connection refused" of "read udp A->B: read:
	// connection refused".
	reason := e.Err
	if i := strings.LastIndex(reason, ": "); i >= 0 {
		reason = reason[i+2:]
	}
	return fmt.Sprintf("%s: %s", text, reason)
}

// walkErrors calls f on err and every error it wraps: through Unwrap, and
// through error lists that only implement As (go-containerregistry's
// fallback from HTTPS to HTTP joins both attempts' errors so).
func walkErrors(err error, f func(error)) {
	if err == nil {
		return
	}
	f(err)
	switch e := err.(type) {
	case interface{ Unwrap() error }:
		walkErrors(e.Unwrap(), f)
	case interface{ Unwrap() []error }:
		for _, inner := range e.Unwrap() {
			walkErrors(inner, f)
		}
	default:
		if v := reflect.ValueOf(err); v.Kind() == reflect.Slice {
			for i := range v.Len() {
				if inner, ok := v.Index(i).Interface().(error); ok {
					walkErrors(inner, f)
				}
			}
		}
	}
}
