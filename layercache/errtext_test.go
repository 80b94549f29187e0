package layercache

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// resetListener accepts connections on loopback and resets each at once
// (SO_LINGER 0), as a registry behind a failing load balancer does: the
// client's error names its own ephemeral port, a different one each time.
func resetListener(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			// Read the request first, so the client is waiting for an
			// answer (a read error), not still writing.
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			_, _ = c.Read(make([]byte, 4096))
			_ = c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	return l.Addr().String()
}

// TestNetworkErrorTextIsStable: the text of a network failure reaches the
// pod's events and kubelet's FailedMount events. Kubernetes counts a
// repeated event only when its text repeats, so the text must not carry
// what changes from one attempt to the next: the client's port.
func TestNetworkErrorTextIsStable(t *testing.T) {
	s := openStore(t, t.TempDir())
	host := resetListener(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var texts []string
	for range 3 {
		_, err := s.Resolve(ctx, host+"/data/set:v1", PullOptions{})
		if err == nil {
			t.Fatal("resolve from a registry that resets every connection succeeded")
		}
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("error is not ErrUnavailable: %v", err)
		}
		texts = append(texts, err.Error())
	}
	for _, text := range texts[1:] {
		if text != texts[0] {
			t.Errorf("the text of the same failure changed between attempts:\n%s\n%s", texts[0], text)
		}
	}
	t.Logf("text: %s", texts[0])
	if !strings.Contains(texts[0], host) || !strings.Contains(texts[0], "connection reset by peer") {
		t.Errorf("the text does not name the registry and the failure: %s", texts[0])
	}
}

// TestDNSErrorTextIsStable: a DNS lookup that fails because the resolver
// cannot be reached names the resolver's socket, ports included, in its
// text; the stable text names the lookup and its outcome only.
func TestDNSErrorTextIsStable(t *testing.T) {
	// A resolver whose server is a closed UDP port on loopback: each
	// lookup fails with "read udp 127.0.0.1:PORT->127.0.0.1:PORT2:
	// connection refused", from a new port each time.
	closed, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := closed.LocalAddr().String()
	closed.Close()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", server)
	}}
	var texts []string
	for range 2 {
		_, err := r.LookupHost(context.Background(), "does-not-exist.invalid")
		var dns *net.DNSError
		if !errors.As(err, &dns) {
			t.Fatalf("lookup error %v is no DNSError", err)
		}
		wrapped := classify(&net.OpError{Op: "dial", Net: "tcp", Err: err}, "resolve does-not-exist.invalid/x:v1")
		texts = append(texts, wrapped.Error())
	}
	if texts[0] != texts[1] {
		t.Errorf("the text of the same DNS failure changed:\n%s\n%s", texts[0], texts[1])
	}
	t.Logf("text: %s", texts[0])
	if want := "DNS lookup of does-not-exist.invalid failed"; !strings.Contains(texts[0], want) {
		t.Errorf("text %q does not say %q", texts[0], want)
	}
}
