// Package rangefetch downloads one large blob over HTTP with several Range
// requests at once, into a file at their offsets, and verifies its SHA-256
// digest on the way: object stores behind registries cap each connection
// well below the link, so N streams fetch a 20 GB layer up to N times
// faster than one.
//
// The digest covers every byte in order: a hasher follows the contiguous
// prefix of chunks that have landed, reading them back from the page cache
// (memory stays at one buffer per stream, whatever the blob's size). Every
// few hundred MiB the verified prefix is made durable (fdatasync) and
// recorded, with the hasher's state, in a sidecar file: a transfer that was
// cut (a crash, kubelet's deadline, a network failure) resumes from there
// at the next call, instead of starting over. A server that ignores Range
// (a plain 200 answer) is read as one stream, from its start.
//
// The file is complete and verified only when Fetch returns nil; the caller
// renames it into place. On a digest mismatch the file and its sidecar are
// removed.
package rangefetch

import (
	"context"
	"crypto/sha256"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/internal/atomicfile"
	"github.com/strata-csi/strata/internal/fault"
)

// ErrDigestMismatch: the bytes fetched do not have the blob's digest.
var ErrDigestMismatch = fault.New(fault.Corrupt, "digest mismatch")

// Defaults of Options.
const (
	DefaultStreams   = 4
	DefaultChunkSize = 32 << 20
	// attempts is how often a chunk is asked for before the fetch fails.
	attempts = 3
)

// checkpointBytes is how much verified data a checkpoint covers at least:
// fdatasync is not free. A variable for the tests.
var checkpointBytes int64 = 256 << 20

// Options tune a fetch.
type Options struct {
	// Streams is the number of Range requests in flight (DefaultStreams
	// if 0); 1 fetches the blob as one stream of ranges.
	Streams int
	// ChunkSize is the size of one Range request (DefaultChunkSize if 0).
	ChunkSize int64
	// Progress, if set, is called (from one goroutine, not concurrently)
	// with the number of bytes verified so far, as it grows.
	Progress func(verified int64)
}

// Result says how a fetch went.
type Result struct {
	// Resumed is where the fetch started: the bytes verified by an earlier,
	// cut, fetch into the same file (0 for a fresh one).
	Resumed int64
	// Fetched is the number of bytes received from the server.
	Fetched int64
	// Ranged: the server answered Range requests (else one stream).
	Ranged bool
}

// checkpoint is the sidecar of a fetch in progress: how much of the file is
// verified, and the hasher's state there.
type checkpoint struct {
	Digest   string `json:"digest"`
	Size     int64  `json:"size"`
	Verified int64  `json:"verified"`
	Hasher   []byte `json:"hasher"`
}

// statePath is the sidecar of the download into path.
func statePath(path string) string { return path + ".progress" }

// Fetch downloads the blob at url, of size bytes and SHA-256 digest want,
// into path, with client (whose transport carries the registry's
// credentials), resuming a fetch into path that an earlier call left
// unfinished. It returns nil only once every byte is in the file and the
// digest verified.
func Fetch(ctx context.Context, client *http.Client, url string, size int64, want v1.Hash, path string, opt Options) (Result, error) {
	if want.Algorithm != "sha256" {
		return Result{}, fmt.Errorf("fetch %s: digest %s: only sha256 is supported", url, want)
	}
	if size < 0 {
		return Result{}, fmt.Errorf("fetch %s: negative size %d", url, size)
	}
	if opt.Streams <= 0 {
		opt.Streams = DefaultStreams
	}
	if opt.ChunkSize <= 0 {
		opt.ChunkSize = DefaultChunkSize
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return Result{}, err
	}
	defer f.Close()
	h, verified := resume(path, want, size)
	if err := f.Truncate(size); err != nil {
		return Result{}, fmt.Errorf("size %s: %w", path, err)
	}
	d := &download{ctx: ctx, client: client, url: url, size: size, want: want, path: path, f: f, opt: opt, h: h, verified: verified}
	d.res.Resumed = verified
	err = d.run()
	if errors.Is(err, ErrDigestMismatch) {
		os.Remove(path)
		os.Remove(statePath(path))
	}
	return d.res, err
}

// resume restores the checkpoint of an earlier fetch of want into path, if
// there is a valid one: the hasher at the verified offset. Otherwise the
// fetch starts at 0.
func resume(path string, want v1.Hash, size int64) (hash.Hash, int64) {
	h := sha256.New()
	var cp checkpoint
	found, err := atomicfile.ReadJSON(statePath(path), &cp)
	if !found || err != nil || cp.Digest != want.String() || cp.Size != size || cp.Verified <= 0 || cp.Verified > size {
		return h, 0
	}
	st, err := os.Stat(path)
	if err != nil || st.Size() < cp.Verified {
		return h, 0
	}
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(cp.Hasher); err != nil {
		return sha256.New(), 0
	}
	return h, cp.Verified
}

type download struct {
	ctx          context.Context
	client       *http.Client
	url          string
	size         int64
	want         v1.Hash
	path         string
	f            *os.File
	opt          Options
	h            hash.Hash
	verified     int64 // hashed, in order
	checkpointed int64
	res          Result
	mu           sync.Mutex // guards res.Fetched
}

// chunk is one Range request: bytes [off, end).
type chunk struct{ off, end int64 }

func (d *download) run() error {
	if d.verified == d.size {
		return d.finish()
	}
	// The first chunk tells whether the server honours Range.
	first := chunk{d.verified, min(d.verified+d.opt.ChunkSize, d.size)}
	resp, err := d.get(first)
	if err != nil {
		return err
	}
	if resp.StatusCode == http.StatusOK {
		// Range ignored: the whole blob, from its first byte.
		return d.stream(resp.Body)
	}
	d.res.Ranged = true
	chunks := []chunk{first}
	for off := first.end; off < d.size; off += d.opt.ChunkSize {
		chunks = append(chunks, chunk{off, min(off+d.opt.ChunkSize, d.size)})
	}
	ctx, cancel := context.WithCancelCause(d.ctx)
	defer cancel(nil)
	// done[i] is closed when chunks[i] is in the file.
	done := make([]chan struct{}, len(chunks))
	for i := range done {
		done[i] = make(chan struct{})
	}
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(d.opt.Streams, len(chunks)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				var err error
				if i == 0 {
					// The answer to the first request is there already.
					err = d.body(resp, chunks[0])
					resp.Body.Close()
					if err != nil {
						err = d.retry(ctx, chunks[0], err)
					}
				} else {
					err = d.retry(ctx, chunks[i], errRetry)
				}
				if err != nil {
					cancel(err)
					return
				}
				close(done[i])
			}
		}()
	}
	go func() {
		defer close(next)
		for i := range chunks {
			select {
			case next <- i:
			case <-ctx.Done():
				if i == 0 {
					resp.Body.Close()
				}
				return
			}
		}
	}()
	// The hasher follows the contiguous prefix.
	var herr error
	for i, c := range chunks {
		select {
		case <-done[i]:
			herr = d.hashRange(c)
		case <-ctx.Done():
			herr = context.Cause(ctx)
		}
		if herr != nil {
			cancel(herr)
			break
		}
	}
	wg.Wait()
	if herr != nil {
		d.checkpoint()
		return herr
	}
	return d.finish()
}

// errRetry asks retry to make the request itself.
var errRetry = errors.New("request the chunk")

// retry asks for chunk c until it is in the file, at most attempts times;
// last is the error of an attempt already made (nil: c is in the file;
// errRetry: none made yet).
func (d *download) retry(ctx context.Context, c chunk, last error) error {
	if last == nil {
		return nil
	}
	for attempt := range attempts {
		if attempt > 0 {
			select {
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		resp, err := d.getCtx(ctx, c)
		if err == nil {
			if resp.StatusCode != http.StatusPartialContent {
				resp.Body.Close()
				return fmt.Errorf("fetch %s: bytes %d-%d: the server answered %s to a Range request after honouring one", d.url, c.off, c.end-1, resp.Status)
			}
			err = d.body(resp, c)
			resp.Body.Close()
			if err == nil {
				return nil
			}
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		last = err
	}
	return last
}

func (d *download) get(c chunk) (*http.Response, error) { return d.getCtx(d.ctx, c) }

// getCtx sends the Range request of c, and checks the answer: 206 with
// the range asked for, or 200 (the server ignores Range).
func (d *download) getCtx(ctx context.Context, c chunk) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", c.off, c.end-1))
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", d.url, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return resp, nil
	case http.StatusPartialContent:
		if err := checkContentRange(resp.Header.Get("Content-Range"), c, d.size); err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("fetch %s: %w", d.url, err)
		}
		return resp, nil
	}
	resp.Body.Close()
	return nil, fmt.Errorf("fetch %s: bytes %d-%d: %s", d.url, c.off, c.end-1, resp.Status)
}

// checkContentRange checks that a 206 answer holds exactly chunk c of a
// blob of size bytes.
func checkContentRange(v string, c chunk, size int64) error {
	var first, last int64
	var total string
	rest, ok := strings.CutPrefix(v, "bytes ")
	if ok {
		var span string
		span, total, ok = strings.Cut(rest, "/")
		if ok {
			a, b, _ := strings.Cut(span, "-")
			var err1, err2 error
			first, err1 = strconv.ParseInt(a, 10, 64)
			last, err2 = strconv.ParseInt(b, 10, 64)
			ok = err1 == nil && err2 == nil
		}
	}
	if !ok || first != c.off || last != c.end-1 || (total != "*" && total != strconv.FormatInt(size, 10)) {
		return fmt.Errorf("asked for bytes %d-%d of %d, got Content-Range %q", c.off, c.end-1, size, v)
	}
	return nil
}

// body writes the answer to chunk c at its offset; it must be exactly c.
func (d *download) body(resp *http.Response, c chunk) error {
	n, err := io.Copy(io.NewOffsetWriter(d.f, c.off), io.LimitReader(resp.Body, c.end-c.off+1))
	d.mu.Lock()
	d.res.Fetched += n
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("fetch %s: bytes %d-%d: %w", d.url, c.off, c.end-1, err)
	}
	if n != c.end-c.off {
		return fmt.Errorf("fetch %s: bytes %d-%d: got %d bytes, want %d", d.url, c.off, c.end-1, n, c.end-c.off)
	}
	return nil
}

// stream reads the whole blob from body (a 200 answer) into the file,
// hashing on the way: bytes already verified are skipped, not written.
func (d *download) stream(body io.ReadCloser) error {
	defer body.Close()
	if _, err := io.CopyN(io.Discard, body, d.verified); err != nil {
		return fmt.Errorf("fetch %s: %w", d.url, err)
	}
	buf := make([]byte, 1<<20)
	for d.verified < d.size {
		n, err := io.ReadFull(body, buf[:min(int64(len(buf)), d.size-d.verified)])
		if n > 0 {
			if _, werr := d.f.WriteAt(buf[:n], d.verified); werr != nil {
				return werr
			}
			d.res.Fetched += int64(n)
			d.advance(buf[:n])
		}
		if err != nil {
			d.checkpoint()
			return fmt.Errorf("fetch %s: after %d of %d bytes: %w", d.url, d.verified, d.size, err)
		}
	}
	if n, _ := body.Read(buf[:1]); n > 0 {
		return fmt.Errorf("fetch %s: more than the %d bytes of the blob: %w", d.url, d.size, ErrDigestMismatch)
	}
	return d.finish()
}

// hashRange hashes chunk c, read back from the file.
func (d *download) hashRange(c chunk) error {
	buf := make([]byte, min(1<<20, c.end-c.off))
	for off := c.off; off < c.end; {
		n, err := d.f.ReadAt(buf[:min(int64(len(buf)), c.end-off)], off)
		if n > 0 {
			d.advance(buf[:n])
			off += int64(n)
		}
		if err != nil && !(errors.Is(err, io.EOF) && off == c.end) {
			return fmt.Errorf("read back %s at %d: %w", d.path, off, err)
		}
	}
	return nil
}

// advance hashes the next verified bytes, checkpointing now and then.
func (d *download) advance(p []byte) {
	d.h.Write(p)
	d.verified += int64(len(p))
	if d.opt.Progress != nil {
		d.opt.Progress(d.verified)
	}
	if d.verified-d.checkpointed >= checkpointBytes {
		d.checkpoint()
	}
}

// checkpoint makes the verified prefix durable and records it. A failure
// only loses the chance to resume from here.
func (d *download) checkpoint() {
	if d.verified <= d.checkpointed {
		return
	}
	state, err := d.h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return
	}
	if d.f.Sync() != nil {
		return
	}
	cp := checkpoint{Digest: d.want.String(), Size: d.size, Verified: d.verified, Hasher: state}
	if atomicfile.WriteJSON(statePath(d.path), cp, 0o600, atomicfile.Options{}) == nil {
		d.checkpointed = d.verified
	}
}

// finish compares the digest, and makes a verified file durable.
func (d *download) finish() error {
	got := fmt.Sprintf("%x", d.h.Sum(nil))
	if got != d.want.Hex {
		return fault.Errorf(ErrDigestMismatch, "fetch %s: the %d bytes fetched have digest sha256:%s, not %s", d.url, d.size, got, d.want)
	}
	if err := d.f.Sync(); err != nil {
		return err
	}
	if err := os.Remove(statePath(d.path)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
