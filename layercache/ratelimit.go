package layercache

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// Rate limits. A registry past a client's allowance answers 429 Too Many
// Requests (Docker Hub counts each manifest GET of an anonymous node against
// a small allowance per IP), usually with Retry-After: when to come back.
//
// The store keeps that moment per host, for all its pulls. Every request to
// a registry, a token server or a mirror passes the rateGate in its
// transport, which waits for the moment before sending it, so that the
// publishes of a node that wait on one host do not each hit it and multiply
// the 429s. When the moment comes, one request goes first; the others follow
// once it was answered with anything but another 429. A wait that would
// outlast the caller's deadline is not waited: the request fails at once
// with a RateLimitError, an ErrUnavailable, and kubelet retries later.
//
// A 429 without Retry-After names no moment: the request is retried with
// the store's usual backoff, and other requests to the host are not held.

// RateLimitError is a registry's 429 Too Many Requests, or a request not
// sent because its host had asked to wait longer than the caller could.
// errors.As finds it in the ErrUnavailable errors of the store.
type RateLimitError struct {
	// Host is the host that refused: a registry, a mirror or a token server.
	Host string
	// RetryAfter is the wait the host asked for in its answer (Retry-After),
	// 0 if it named none.
	RetryAfter time.Duration

	until time.Time // no request to Host before; zero if none was asked
}

// Error reads "rate-limited by HOST, retry after N s", N the wait the host
// asked for, rounded up to seconds. The wait is the one of the host's
// answer, not the time left when the error was made: a registry sends the
// same Retry-After while its limit lasts, so that the text stays the same
// from one failed publish to the next and Kubernetes counts their events as
// one.
func (e *RateLimitError) Error() string {
	if e.RetryAfter <= 0 {
		return "rate-limited by " + e.Host
	}
	return fmt.Sprintf("rate-limited by %s, retry after %d s", e.Host, ceilSeconds(e.RetryAfter))
}

func ceilSeconds(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

const (
	// maxRetryAfter: a longer Retry-After is ignored, as if there were none
	// (the usual backoff applies). No registry asks a client to stay away
	// for hours; such a value is a misconfigured proxy, and obeying it would
	// hold a background pull for as long.
	maxRetryAfter = time.Hour
	// maxRateLimitedHosts bounds the hosts counted one by one in
	// Stats.RateLimited (and the metric's host label): image references
	// may name any host, and the 429s of the hosts past it are counted
	// under OtherHosts.
	maxRateLimitedHosts = 100
	// OtherHosts is the key of Stats.RateLimited that counts the hosts past
	// the first maxRateLimitedHosts.
	OtherHosts = "other"
)

// parseRetryAfter reads a Retry-After header, seconds or an HTTP date
// (RFC 9110, section 10.2.3). ok is false for none, a value that does not
// parse, a wait of zero or less (a date in the past), and one beyond
// maxRetryAfter.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs > int64(maxRetryAfter/time.Second) {
			return 0, false
		}
		d = time.Duration(secs) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	} else {
		return 0, false
	}
	if d <= 0 || d > maxRetryAfter {
		return 0, false
	}
	return d, true
}

// rateLimits keeps, per host, the moment before which nothing is sent to
// it, and counts its 429s. One serves all the store's pulls.
type rateLimits struct {
	mu     sync.Mutex
	waits  map[string]*hostWait
	counts map[string]int64 // 429s by host, at most maxRateLimitedHosts and OtherHosts
}

// hostWait is what a host asked: no request before until. Once until has
// passed, the first request to the host probes whether the limit is over,
// while the others wait for its answer (probe, closed then).
type hostWait struct {
	until      time.Time
	retryAfter time.Duration
	probe      chan struct{}
}

func newRateLimits() *rateLimits {
	return &rateLimits{waits: map[string]*hostWait{}, counts: map[string]int64{}}
}

// admit waits until a request may be sent to host. probing is true when
// this request is the one to find out whether the host's wait is over: the
// caller must then report its answer with answered. wait false (a mirror,
// which has a fallback) fails at once instead of waiting.
func (l *rateLimits) admit(ctx context.Context, host string, wait bool) (probing bool, err error) {
	for {
		l.mu.Lock()
		w := l.waits[host]
		if w == nil {
			l.mu.Unlock()
			return false, nil
		}
		if d := time.Until(w.until); d > 0 {
			rl := &RateLimitError{Host: host, RetryAfter: w.retryAfter, until: w.until}
			l.mu.Unlock()
			if dl, ok := ctx.Deadline(); !wait || ok && dl.Before(rl.until) {
				return false, rl
			}
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
				t.Stop()
				return false, ctx.Err()
			case <-t.C:
			}
			continue
		}
		if w.probe == nil {
			w.probe = make(chan struct{})
			l.mu.Unlock()
			return true, nil
		}
		probe, bound := w.probe, max(w.retryAfter, time.Second)
		l.mu.Unlock()
		if !wait {
			return false, nil
		}
		// The probe's answer is waited for as long as the host's last
		// wait at most: a probe that hangs (a registry that sends no
		// headers) must not hold every other request to the host.
		t := time.NewTimer(bound)
		select {
		case <-ctx.Done():
			t.Stop()
			return false, ctx.Err()
		case <-t.C:
			return false, nil
		case <-probe:
			t.Stop()
		}
	}
}

// answered records how the probe of a host's wait ended: lift, for any
// answer but a 429, lifts the wait. A 429 has set a new wait (limited); a
// request that got no answer (a refused connection, an HTTPS attempt at a
// plain-HTTP registry, a cancelled call) tells nothing, and the next
// request probes instead.
func (l *rateLimits) answered(host string, lift bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.waits[host]
	if w == nil || w.probe == nil {
		return
	}
	close(w.probe)
	w.probe = nil
	if lift && !time.Now().Before(w.until) {
		delete(l.waits, host)
	}
}

// limited records a 429 of host that asked to wait retryAfter (0: it did
// not say), and returns the error that reports it.
func (l *rateLimits) limited(host string, retryAfter time.Duration) *RateLimitError {
	l.mu.Lock()
	defer l.mu.Unlock()
	key := host
	if _, ok := l.counts[host]; !ok && len(l.counts) >= maxRateLimitedHosts {
		key = OtherHosts
	}
	l.counts[key]++
	rl := &RateLimitError{Host: host, RetryAfter: retryAfter}
	if retryAfter <= 0 {
		return rl
	}
	rl.until = time.Now().Add(retryAfter)
	w := l.waits[host]
	if w == nil {
		l.pruneLocked()
		w = &hostWait{}
		l.waits[host] = w
	}
	if rl.until.After(w.until) {
		w.until = rl.until
	}
	w.retryAfter = retryAfter
	return rl
}

// pruneLocked forgets the waits that are over, so that the map holds only
// the hosts that are limiting now. The caller holds mu.
func (l *rateLimits) pruneLocked() {
	now := time.Now()
	for host, w := range l.waits {
		if w.probe == nil && now.After(w.until) {
			delete(l.waits, host)
		}
	}
}

// counted returns the 429s counted per host.
func (l *rateLimits) counted() map[string]int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.counts)
}

// rateGate holds each request until its host's wait is over, and turns a
// 429 into a RateLimitError after noting the wait the host asked for.
type rateGate struct {
	next http.RoundTripper
	lim  *rateLimits
	// wait is false for a mirror: it has a fallback, so a request to a
	// mirror that asked to wait fails at once and goes to the next place.
	wait bool
}

var _ http.RoundTripper = (*rateGate)(nil)

func (g *rateGate) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Host
	probing, err := g.lim.admit(req.Context(), host, g.wait)
	if err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	resp, err := g.next.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusTooManyRequests {
		if probing {
			g.lim.answered(host, err == nil)
		}
		return resp, err
	}
	retryAfter, _ := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	// The answer's body says nothing a caller needs; drain a little of it
	// so that the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	rl := g.lim.limited(host, retryAfter)
	if probing {
		g.lim.answered(host, false)
	}
	klog.V(2).InfoS("Registry rate-limited a request", "host", host, "method", req.Method, "path", req.URL.Path,
		"retryAfter", retryAfter, "header", resp.Header.Get("Retry-After"))
	return nil, rl
}
