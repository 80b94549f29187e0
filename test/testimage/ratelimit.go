package testimage

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// RateLimit is a registry wrapper (its Wrap is for Server) that answers 429
// Too Many Requests, as Docker Hub does once a client has spent its
// allowance, and records every request it sees.
//
// It lets everything through, unrecorded, until Arm is called (so that a
// test pushes its images first). Then it refuses either the first request of each path (EachPathOnce: every
// manifest and blob is refused once, then served), or every request that
// comes within Window of the first refused one (a window that a real limiter
// keeps closed, whatever the client does).
type RateLimit struct {
	// RetryAfter is the Retry-After header of a refusal; "" sends none.
	RetryAfter string
	// Match picks the requests that may be refused; nil: all of them.
	Match func(*http.Request) bool
	// EachPathOnce refuses the first matching request of each path.
	EachPathOnce bool
	// Window refuses every matching request within Window of the first
	// refusal (when EachPathOnce is false).
	Window time.Duration

	mu     sync.Mutex
	armed  bool
	start  time.Time
	seen   map[string]int
	served []Request
}

// Request is one request a RateLimit saw.
type Request struct {
	At      time.Time
	Method  string
	Path    string
	Limited bool // answered 429
}

// ManifestsAndBlobs matches the requests for manifests and blobs (not the
// ping of /v2/, nor a token).
func ManifestsAndBlobs(r *http.Request) bool {
	return strings.Contains(r.URL.Path, "/manifests/") || strings.Contains(r.URL.Path, "/blobs/")
}

// Wrap wraps a registry handler.
func (l *RateLimit) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		limited := l.refuse(r)
		if !limited {
			next.ServeHTTP(w, r)
			return
		}
		if l.RetryAfter != "" {
			w.Header().Set("Retry-After", l.RetryAfter)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}`)
	})
}

// refuse records r and decides whether it is refused.
func (l *RateLimit) refuse(r *http.Request) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.armed {
		return false
	}
	now := time.Now()
	limited := false
	if l.Match == nil || l.Match(r) {
		key := r.Method + " " + r.URL.Path
		if l.seen == nil {
			l.seen = map[string]int{}
		}
		l.seen[key]++
		switch {
		case l.EachPathOnce:
			limited = l.seen[key] == 1
		case l.start.IsZero():
			l.start, limited = now, true
		default:
			limited = now.Sub(l.start) < l.Window
		}
	}
	l.served = append(l.served, Request{At: now, Method: r.Method, Path: r.URL.Path, Limited: limited})
	return limited
}

// Requests returns the requests seen so far, in order.
func (l *RateLimit) Requests() []Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Request(nil), l.served...)
}

// Refused is how many requests so far were answered 429.
func (l *RateLimit) Refused() int {
	n := 0
	for _, r := range l.Requests() {
		if r.Limited {
			n++
		}
	}
	return n
}

// Arm forgets every request seen and starts refusing: the next matching
// request opens a new window, and every path is new again.
func (l *RateLimit) Arm() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.armed, l.start, l.seen, l.served = true, time.Time{}, nil, nil
}
