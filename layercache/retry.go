package layercache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"k8s.io/klog/v2"
)

// Retry policy for registry requests: a few attempts with exponential
// backoff, for answers that may change (5xx, 429, a dropped connection). A
// 429 with Retry-After is retried when the registry asked instead (see
// rateGate).
const (
	DefaultRetryAttempts = 5
	DefaultRetryBackoff  = 250 * time.Millisecond
	maxRetryBackoff      = 8 * time.Second
)

// WithRetry sets how many times a registry request is tried (at least 1)
// and the first backoff, doubled after each failure.
func WithRetry(attempts int, backoff time.Duration) Option {
	return func(o *options) error {
		if attempts < 1 || backoff < 0 {
			return fmt.Errorf("retry: want at least 1 attempt and a non-negative backoff, got %d and %s", attempts, backoff)
		}
		o.retryAttempts, o.retryBackoff = attempts, backoff
		return nil
	}
}

// retryN runs op until it succeeds, fails with an error that retrying cannot
// fix, or the given attempts are spent: a mirror gets one, since it has a
// fallback.
func (s *Store) retryN(ctx context.Context, what string, attempts int, op func() error) error {
	backoff := s.opts.retryBackoff
	for attempt := 1; ; attempt++ {
		err := op()
		if err == nil || !errors.Is(err, ErrUnavailable) || errors.As(err, new(tlsSetupError)) || ctx.Err() != nil {
			return err
		}
		var rl *RateLimitError
		if errors.As(err, &rl) && !rl.until.IsZero() {
			// The host named when to come back: the next attempt waits
			// for that moment in the transport (rateGate), with every
			// other request to the host, instead of the backoff. A wait
			// past the caller's deadline is not waited: kubelet retries.
			if dl, ok := ctx.Deadline(); ok && dl.Before(rl.until) {
				return err
			}
			if attempt >= attempts {
				return fmt.Errorf("%w (after %d attempts)", err, attempt)
			}
			klog.V(2).InfoS("Registry rate-limited a request; retrying when it asked", "what", what, "attempt", attempt,
				"retryIn", time.Until(rl.until).Round(time.Millisecond), "err", err)
			continue
		}
		if attempt >= attempts {
			return fmt.Errorf("%w (after %d attempts)", err, attempt)
		}
		klog.V(2).InfoS("Registry request failed; retrying", "what", what, "attempt", attempt, "retryIn", backoff, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxRetryBackoff)
	}
}

// blobFrom opens a blob of the given size (0 if unknown) from byte off on:
// a Range request when off > 0, closed when the size is known (some
// registries refuse open ranges). A registry that ignores the range sends
// the whole blob, and one that refuses it is asked for the whole blob; the
// bytes before off are then skipped.
func (c *client) blobFrom(ctx context.Context, d v1.Hash, off, size int64) (io.ReadCloser, int64, error) {
	what := "fetch blob " + c.repo.String() + "@" + d.String()
	get := func(rng string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("blobs", d.String()), nil)
		if err != nil {
			return nil, err
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		return c.http.Do(req)
	}
	rng := ""
	if off > 0 {
		rng = "bytes=" + strconv.FormatInt(off, 10) + "-"
		if size > 0 {
			rng += strconv.FormatInt(size-1, 10)
		}
	}
	resp, err := get(rng)
	if err == nil && rng != "" && resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
		resp.Body.Close()
		resp, err = get("")
	}
	if err != nil {
		return nil, 0, classify(err, what)
	}
	if err := transport.CheckError(resp, http.StatusOK, http.StatusPartialContent); err != nil {
		resp.Body.Close()
		return nil, 0, classify(err, what)
	}
	if off > 0 && resp.StatusCode == http.StatusOK {
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			resp.Body.Close()
			return nil, 0, classify(err, what)
		}
	}
	return resp.Body, resp.ContentLength, nil
}

// resumingReader streams a blob and, when the connection fails part-way,
// opens it again from where it stopped, within the store's retry policy.
// The caller's hash sees one continuous stream.
type resumingReader struct {
	ctx      context.Context
	s        *Store
	c        *client
	attempts int // per request, and resumes in all
	d        v1.Hash
	size     int64 // from the manifest; 0 if unknown
	what     string

	rc      io.ReadCloser
	off     int64
	resumes int
}

// open makes the first request, retrying answers that may change. It
// returns the length the registry announced (-1 if none).
func (r *resumingReader) open() (int64, error) {
	var n int64
	err := r.s.retryN(r.ctx, r.what, r.attempts, func() error {
		var err error
		r.rc, n, err = r.c.blobFrom(r.ctx, r.d, 0, r.size)
		return err
	})
	return n, err
}

func (r *resumingReader) Read(p []byte) (int, error) {
	n, err := r.rc.Read(p)
	r.off += int64(n)
	if err == nil || err == io.EOF || r.ctx.Err() != nil {
		return n, err
	}
	// The connection broke: reopen from r.off, and hand out what arrived.
	cerr := classify(err, "read "+r.what)
	if !errors.Is(cerr, ErrUnavailable) || r.resumes >= r.attempts {
		return n, cerr
	}
	r.rc.Close()
	r.resumes++
	klog.V(2).InfoS("Blob download broke off; resuming", "blob", r.d, "offset", r.off, "resume", r.resumes, "err", err)
	if rerr := r.s.retryN(r.ctx, r.what, r.attempts, func() error {
		var err error
		r.rc, _, err = r.c.blobFrom(r.ctx, r.d, r.off, r.size)
		return err
	}); rerr != nil {
		r.rc = io.NopCloser(errReader{rerr})
		if n > 0 {
			return n, nil
		}
		return 0, rerr
	}
	return n, nil
}

// Close closes the current response.
func (r *resumingReader) Close() error { return r.rc.Close() }

// errReader fails every read with err.
type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }
