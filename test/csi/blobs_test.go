package csitest

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-csi/strata/test/testimage"
)

// blobRegistry is a loopback registry that counts blob downloads by digest
// and the request body bytes it receives (pushes), and can trickle
// downloads out slowly.
type blobRegistry struct {
	addr string

	mu   sync.Mutex
	gets map[string]int
	recv int64
}

// newBlobRegistry starts a registry whose blob responses go out in 32 KiB
// chunks, delay apart (0: at full speed).
func newBlobRegistry(t testing.TB, delay time.Duration) *blobRegistry {
	t.Helper()
	b := &blobRegistry{gets: map[string]int{}}
	b.addr = testimage.Server(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				b.mu.Lock()
				b.gets[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]++
				b.mu.Unlock()
				if delay > 0 {
					w = slowWriter{ResponseWriter: w, delay: delay}
				}
			}
			if r.Body != nil {
				r.Body = countingBody{ReadCloser: r.Body, b: b}
			}
			next.ServeHTTP(w, r)
		})
	})
	return b
}

// counts returns a copy of the downloads by digest.
func (b *blobRegistry) counts() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]int, len(b.gets))
	for k, v := range b.gets {
		out[k] = v
	}
	return out
}

// reset forgets the downloads and received bytes so far (a push's own
// reads, if any).
func (b *blobRegistry) reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	clear(b.gets)
	b.recv = 0
}

// received returns the request body bytes received since the last reset.
func (b *blobRegistry) received() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.recv
}

// countingBody adds what a request body carries to b.recv.
type countingBody struct {
	io.ReadCloser
	b *blobRegistry
}

func (c countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.b.mu.Lock()
	c.b.recv += int64(n)
	c.b.mu.Unlock()
	return n, err
}

// slowWriter trickles a response out in small chunks.
type slowWriter struct {
	http.ResponseWriter
	delay time.Duration
}

func (w slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := min(len(p), 32<<10)
		m, err := w.ResponseWriter.Write(p[:c])
		n += m
		if err != nil {
			return n, err
		}
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		p = p[c:]
		time.Sleep(w.delay)
	}
	return n, nil
}
