package layercache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/strata-csi/strata/layercache/rangefetch"
	"github.com/strata-csi/strata/layercache/unpack"
)

// DefaultRangedRawBytes is the size from which a raw artifact file is
// fetched with several Range requests at once (package rangefetch): object
// stores behind registries cap each connection well below the link, and a
// model's weights are often one file of many gigabytes. Smaller ones are
// one stream, as a layer is.
const DefaultRangedRawBytes = 64 << 20

// ranged tunes the ranged fetch of raw files (the store's options; the
// tests make it small).
type ranged struct {
	minBytes, chunk int64
	streams         int
}

var defaultRanged = ranged{minBytes: DefaultRangedRawBytes, chunk: rangefetch.DefaultChunkSize, streams: rangefetch.DefaultStreams}

// fetchRawResumable fetches the large raw file l into file: through its
// partial download under partial/ (claimPartial), which a cut transfer
// leaves for the next try, in this process or the next, to resume; moved to
// file once it verified. When another process is downloading it, straight
// into file, from scratch.
func (s *Store) fetchRawResumable(ctx context.Context, c *client, what string, l Layer, file string, meter *layerMeter, progress func(ProgressEvent)) (unpack.Stats, error) {
	partial, release, ok, err := s.claimPartial(l.Digest)
	if err != nil {
		return unpack.Stats{}, err
	}
	if !ok {
		stats, _, err := fetchRawRanged(ctx, s.opts.ranged, c, what, l, file, meter, progress)
		return stats, err
	}
	done := false
	defer func() { release(done) }()
	stats, _, err := fetchRawRanged(ctx, s.opts.ranged, c, what, l, partial, meter, progress)
	if err != nil {
		return stats, err
	}
	if err := os.Rename(partial, file); err != nil {
		return stats, fmt.Errorf("%s: move the finished download into place: %w", what, err)
	}
	done = true
	return stats, nil
}

// fetchRawRanged fetches l's blob from c into file with parallel Range
// requests (one stream if the registry ignores Range), charging meter with
// its size first, and verifies its digest. It returns the bytes received.
func fetchRawRanged(ctx context.Context, rg ranged, c *client, what string, l Layer, file string, meter *layerMeter, progress func(ProgressEvent)) (unpack.Stats, int64, error) {
	if err := meter.Entry(); err != nil {
		return unpack.Stats{}, 0, fmt.Errorf("%s (nothing of it was kept): %w", what, err)
	}
	if err := meter.Content(l.Size); err != nil {
		return unpack.Stats{}, 0, fmt.Errorf("%s (nothing of it was kept): %w", what, err)
	}
	// The client's transport carries the registry's credentials and its
	// rules (HTTPS only, per-host TLS); an error answer becomes the store's
	// error (not found, refused, unavailable) before rangefetch sees it.
	hc := &http.Client{Transport: &classifying{next: c.http.Transport, what: "fetch " + what}}
	opt := rangefetch.Options{Streams: rg.streams, ChunkSize: rg.chunk}
	if progress != nil {
		opt.Progress = func(n int64) { progress(ProgressEvent{Layer: l, State: LayerFetching, Done: n}) }
	}
	res, err := rangefetch.Fetch(ctx, hc, c.url("blobs", l.Digest.String()), l.Size, l.Digest, file, opt)
	switch {
	case err == nil:
	case errors.Is(err, rangefetch.ErrDigestMismatch):
		return unpack.Stats{}, 0, fmt.Errorf("%w: %s: %v: nothing was stored", ErrDigestMismatch, what, err)
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrUnauthorized), errors.Is(err, ErrUnavailable),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return unpack.Stats{}, 0, err
	default:
		for _, e := range nodeErrors {
			if errors.Is(err, e) {
				return unpack.Stats{}, 0, fmt.Errorf("%s: %w: nothing was stored", what, err)
			}
		}
		return unpack.Stats{}, 0, classify(err, what)
	}
	// rangefetch writes its file private; a raw file is read by pods.
	if err := os.Chmod(file, 0o644); err != nil {
		return unpack.Stats{}, 0, err
	}
	return unpack.Stats{Bytes: l.Size, Files: 1, Entries: 1}, res.Fetched, nil
}

// classifying turns a registry's error answer (4xx, 5xx) into the store's
// error, and passes every other answer (2xx, redirects) on.
type classifying struct {
	next http.RoundTripper
	what string
}

func (t *classifying) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil || resp.StatusCode < 400 {
		return resp, err
	}
	err = transport.CheckError(resp, http.StatusOK, http.StatusPartialContent)
	resp.Body.Close()
	return nil, classify(err, t.what)
}
