package testimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Streamed makes a layer whose tar stream write produces, compressing it as
// it is written: only the compressed bytes are held in memory, so a layer
// that unpacks to gigabytes (a decompression bomb) costs its compressed size.
func Streamed(t testing.TB, c Compression, write func(tw *tar.Writer) error) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	var zw io.WriteCloser
	mt := types.OCILayer
	switch c {
	case Gzip:
		w, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
		if err != nil {
			t.Fatal(err)
		}
		zw = w
	case Zstd:
		w, err := zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
		if err != nil {
			t.Fatal(err)
		}
		zw, mt = w, types.OCILayerZStd
	default:
		t.Fatalf("streamed layer: compression %q: use Gzip or Zstd", c)
	}
	dh := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(dh, zw))
	if err := write(tw); err != nil {
		t.Fatalf("write streamed layer: %v", err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	sum := sha256.Sum256(data)
	return &streamedLayer{
		data:   data,
		c:      c,
		mt:     mt,
		digest: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])},
		diffID: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(dh.Sum(nil))},
	}
}

// Bomb makes a layer holding one file, name, of size bytes all equal to
// fill: about 1 MiB of gzip per GiB (gzip's limit is about 1032:1) and much
// less with zstd. A fill of 0 makes a file that the unpacker writes sparse;
// any other byte makes every block real. The compressed stream is a
// concatenation of gzip members (zstd frames), which every decompressor
// reads as one stream; it lets a 1 GiB bomb be made by compressing 16 MiB
// once, instead of 1 GiB.
func Bomb(t testing.TB, c Compression, name string, size int64, fill byte) v1.Layer {
	t.Helper()
	var hdr bytes.Buffer
	// Only the header: the tar writer writes it at once, the content is
	// made here.
	if err := tar.NewWriter(&hdr).WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: Epoch, Format: tar.FormatPAX}); err != nil {
		t.Fatal(err)
	}
	// Padding to a 512-byte block, then the two zero blocks that end a tar.
	trailer := make([]byte, (512-size%512)%512+1024)
	const chunk = 16 << 20
	block := bytes.Repeat([]byte{fill}, chunk)
	member := func(b []byte) []byte {
		var buf bytes.Buffer
		var zw io.WriteCloser
		var err error
		if c == Zstd {
			zw, err = zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
		} else {
			zw, err = gzip.NewWriterLevel(&buf, gzip.BestCompression)
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := zw.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	if c != Gzip && c != Zstd {
		t.Fatalf("bomb layer: compression %q: use Gzip or Zstd", c)
	}
	var data bytes.Buffer
	dh := sha256.New()
	add := func(b []byte, m []byte) {
		dh.Write(b)
		data.Write(m)
	}
	add(hdr.Bytes(), member(hdr.Bytes()))
	full := member(block)
	for n := size; n > 0; n -= chunk {
		if n >= chunk {
			add(block, full)
		} else {
			add(block[:n], member(block[:n]))
		}
	}
	add(trailer, member(trailer))
	sum := sha256.Sum256(data.Bytes())
	mt := types.OCILayer
	if c == Zstd {
		mt = types.OCILayerZStd
	}
	return &streamedLayer{
		data:   data.Bytes(),
		c:      c,
		mt:     mt,
		digest: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])},
		diffID: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(dh.Sum(nil))},
	}
}

// ManyFiles makes a layer of n empty files spread over directories of 1000.
func ManyFiles(t testing.TB, c Compression, n int) v1.Layer {
	t.Helper()
	return Streamed(t, c, func(tw *tar.Writer) error {
		for i := range n {
			if i%1000 == 0 {
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: fmt.Sprintf("d%d/", i/1000), Mode: 0o755, ModTime: Epoch}); err != nil {
					return err
				}
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("d%d/f%d", i/1000, i), Mode: 0o644, ModTime: Epoch}); err != nil {
				return err
			}
		}
		return nil
	})
}

// streamedLayer is a layer held as its compressed bytes.
type streamedLayer struct {
	data           []byte
	c              Compression
	mt             types.MediaType
	digest, diffID v1.Hash
}

func (l *streamedLayer) Digest() (v1.Hash, error)            { return l.digest, nil }
func (l *streamedLayer) DiffID() (v1.Hash, error)            { return l.diffID, nil }
func (l *streamedLayer) Size() (int64, error)                { return int64(len(l.data)), nil }
func (l *streamedLayer) MediaType() (types.MediaType, error) { return l.mt, nil }
func (l *streamedLayer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.data)), nil
}

// Uncompressed decompresses as it is read; nothing here calls it for a
// bomb, but a v1.Layer must have it.
func (l *streamedLayer) Uncompressed() (io.ReadCloser, error) {
	if l.c == Zstd {
		d, err := zstd.NewReader(bytes.NewReader(l.data))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	}
	return gzip.NewReader(bytes.NewReader(l.data))
}
