package commit

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
)

// Layer is a gzip-compressed layer built from an upper directory, held in a
// temporary file until Close. It implements v1.Layer with the digests
// computed while it was written, so a push reads the file once more, to
// upload it, and never to hash it.
type Layer struct {
	path   string
	digest v1.Hash // of the compressed blob
	diffID v1.Hash // of the uncompressed tar
	size   int64   // of the compressed blob
	// Stats tells what the layer holds.
	Stats Stats
}

var _ v1.Layer = (*Layer)(nil)

// Build writes the layer of the upper directory upper into a new file in
// dir, in one pass: tar, hashed for the diffID, then gzip, hashed for the
// digest and counted on its way to the file. dir should be on a local disk
// with room for the compressed changes (the store's work directory).
func Build(ctx context.Context, upper, dir string) (*Layer, error) {
	f, err := os.CreateTemp(dir, "commit-*.tar.gz")
	if err != nil {
		return nil, fmt.Errorf("create the layer file: %w", err)
	}
	l := &Layer{path: f.Name()}
	if err := l.fill(ctx, f, upper); err != nil {
		f.Close()
		os.Remove(l.path)
		return nil, err
	}
	if err := f.Close(); err != nil {
		os.Remove(l.path)
		return nil, fmt.Errorf("write the layer file: %w", err)
	}
	return l, nil
}

// fill streams upper -> tar -> gzip -> f, hashing both sides.
func (l *Layer) fill(ctx context.Context, f *os.File, upper string) error {
	blobHash, tarHash := sha256.New(), sha256.New()
	bw := bufio.NewWriterSize(f, 1<<20)
	blob := &countingWriter{w: io.MultiWriter(bw, blobHash)}
	gz := gzip.NewWriter(blob)
	stats, err := WriteTar(ctx, upper, io.MultiWriter(gz, tarHash))
	if err != nil {
		return err
	}
	if err := gz.Close(); err != nil {
		return fmt.Errorf("compress the layer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write the layer file: %w", err)
	}
	l.Stats, l.size = stats, blob.n
	l.digest, l.diffID = sum(blobHash), sum(tarHash)
	return nil
}

func sum(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Close removes the layer file.
func (l *Layer) Close() error { return os.Remove(l.path) }

// Digest is the digest of the compressed blob.
func (l *Layer) Digest() (v1.Hash, error) { return l.digest, nil }

// DiffID is the digest of the uncompressed tar.
func (l *Layer) DiffID() (v1.Hash, error) { return l.diffID, nil }

// Size is the size of the compressed blob.
func (l *Layer) Size() (int64, error) { return l.size, nil }

// MediaType is the OCI gzip layer type; Push sets Docker's when the base
// image is a Docker image.
func (l *Layer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }

// Compressed opens the blob.
func (l *Layer) Compressed() (io.ReadCloser, error) { return os.Open(l.path) }

// Uncompressed opens the tar.
func (l *Layer) Uncompressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, err
	}
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		f.Close()
		return nil, err
	}
	return &readCloser{Reader: zr, close: func() error { zr.Close(); return f.Close() }}, nil
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r *readCloser) Close() error { return r.close() }
