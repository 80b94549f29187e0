package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// layerInfo describes a generated layer; a list of them is kept beside the
// layout in mkimage.json.
type layerInfo struct {
	Name         string          `json:"name"`
	Digest       v1.Hash         `json:"digest"`
	DiffID       v1.Hash         `json:"diffID"`
	Size         int64           `json:"size"`
	Uncompressed int64           `json:"uncompressed"`
	MediaType    types.MediaType `json:"mediaType"`
	Files        int             `json:"files"`
	Entries      int             `json:"entries"`
	Seconds      float64         `json:"seconds"`
}

// cacheMeta is mkimage.json in a cached layout.
type cacheMeta struct {
	Key      string      `json:"key"`
	Manifest v1.Hash     `json:"manifest"`
	Layers   []layerInfo `json:"layers"`
	Seconds  float64     `json:"seconds"`
}

// blobLayer is a v1.Layer backed by a blob file whose digests are known.
type blobLayer struct {
	path string
	info layerInfo
}

func (l *blobLayer) Digest() (v1.Hash, error)            { return l.info.Digest, nil }
func (l *blobLayer) DiffID() (v1.Hash, error)            { return l.info.DiffID, nil }
func (l *blobLayer) Size() (int64, error)                { return l.info.Size, nil }
func (l *blobLayer) MediaType() (types.MediaType, error) { return l.info.MediaType, nil }
func (l *blobLayer) Compressed() (io.ReadCloser, error)  { return os.Open(l.path) }
func (l *blobLayer) Uncompressed() (io.ReadCloser, error) {
	return openUncompressed(l.path, l.info.MediaType)
}

func openUncompressed(path string, mt types.MediaType) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	switch mt {
	case types.OCILayer, types.DockerLayer:
		zr, err := gzip.NewReader(bufio.NewReader(f))
		if err != nil {
			f.Close()
			return nil, err
		}
		return readCloser{zr, func() error { zr.Close(); return f.Close() }}, nil
	case types.OCILayerZStd:
		zr, err := zstd.NewReader(bufio.NewReader(f))
		if err != nil {
			f.Close()
			return nil, err
		}
		return readCloser{zr, func() error { zr.Close(); return f.Close() }}, nil
	}
	return f, nil
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r readCloser) Close() error { return r.close() }

// mediaType returns the OCI layer media type of a compression name.
func mediaType(compression string) (types.MediaType, error) {
	switch compression {
	case "gzip":
		return types.OCILayer, nil
	case "zstd":
		return types.OCILayerZStd, nil
	case "none":
		return types.OCIUncompressedLayer, nil
	}
	return "", fmt.Errorf("unknown compression %q (want gzip, zstd or none)", compression)
}

type hashWriter struct {
	h hash.Hash
	n int64
}

func (w *hashWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	w.n += int64(len(p))
	return len(p), nil
}

// writeLayerBlob streams the layer's tar through the compressor into a blob
// of the layout at dir, hashing both streams on the way.
func writeLayerBlob(dir string, lp *layerPlan, compression string) (layerInfo, error) {
	start := time.Now()
	mt, err := mediaType(compression)
	if err != nil {
		return layerInfo{}, err
	}
	blobs := filepath.Join(dir, "blobs", "sha256")
	f, err := os.CreateTemp(blobs, "layer-*.tmp")
	if err != nil {
		return layerInfo{}, err
	}
	defer os.Remove(f.Name()) // no-op after the rename
	defer f.Close()

	bw := bufio.NewWriterSize(f, 1<<20)
	compressed := &hashWriter{h: sha256.New()}
	out := io.MultiWriter(bw, compressed)
	var zw io.WriteCloser
	switch compression {
	case "gzip":
		zw, err = gzip.NewWriterLevel(out, gzip.DefaultCompression)
	case "zstd":
		zw, err = zstd.NewWriter(out, zstd.WithEncoderConcurrency(1))
	default:
		zw = nopCloser{out}
	}
	if err != nil {
		return layerInfo{}, err
	}
	uncompressed := &hashWriter{h: sha256.New()}
	tarOut := bufio.NewWriterSize(io.MultiWriter(zw, uncompressed), 256<<10)
	if err := lp.writeTar(tarOut); err != nil {
		return layerInfo{}, fmt.Errorf("layer %s: %w", lp.name, err)
	}
	if err := tarOut.Flush(); err != nil {
		return layerInfo{}, err
	}
	if err := zw.Close(); err != nil {
		return layerInfo{}, err
	}
	if err := bw.Flush(); err != nil {
		return layerInfo{}, err
	}
	if err := f.Close(); err != nil {
		return layerInfo{}, err
	}
	digest := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(compressed.h.Sum(nil))}
	if err := os.Rename(f.Name(), filepath.Join(blobs, digest.Hex)); err != nil {
		return layerInfo{}, err
	}
	files, entries, _ := lp.counts()
	return layerInfo{
		Name:         lp.name,
		Digest:       digest,
		DiffID:       v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(uncompressed.h.Sum(nil))},
		Size:         compressed.n,
		Uncompressed: uncompressed.n,
		MediaType:    mt,
		Files:        files,
		Entries:      entries,
		Seconds:      time.Since(start).Seconds(),
	}, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// buildLayout generates all layers, jobs at a time, largest first, into a new
// OCI layout at dir and adds the image to its index.
func buildLayout(dir, key string, plans []*layerPlan, compression string, jobs int, progress func(layerInfo)) (*cacheMeta, error) {
	start := time.Now()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	order := make([]int, len(plans))
	for i := range order {
		order[i] = i
	}
	weight := make([]int64, len(plans))
	for i, lp := range plans {
		_, _, weight[i] = lp.counts()
	}
	sort.SliceStable(order, func(a, b int) bool { return weight[order[a]] > weight[order[b]] })

	infos := make([]layerInfo, len(plans))
	errs := make([]error, len(plans))
	work := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := 0; w < jobs; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				infos[i], errs[i] = writeLayerBlob(dir, plans[i], compression)
				if errs[i] == nil && progress != nil {
					mu.Lock()
					progress(infos[i])
					mu.Unlock()
				}
			}
		}()
	}
	for _, i := range order {
		work <- i
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	cfg := &v1.ConfigFile{
		Architecture: "amd64",
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Env:    []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Labels: map[string]string{"dev.strata.mkimage": key},
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	adds := make([]mutate.Addendum, len(plans))
	for i, info := range infos {
		adds[i] = mutate.Addendum{
			Layer:     &blobLayer{path: filepath.Join(dir, "blobs", "sha256", info.Digest.Hex), info: info},
			MediaType: info.MediaType,
			History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "hack/mkimage " + info.Name},
		}
	}
	if img, err = mutate.Append(img, adds...); err != nil {
		return nil, err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": key})); err != nil {
		return nil, err
	}
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	meta := &cacheMeta{Key: key, Manifest: d, Layers: infos, Seconds: time.Since(start).Seconds()}
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return nil, err
	}
	return meta, os.WriteFile(filepath.Join(dir, "mkimage.json"), b, 0o644)
}

// readCached returns the metadata of a complete cached layout, or an error
// if it is missing or incomplete.
func readCached(dir string) (*cacheMeta, error) {
	b, err := os.ReadFile(filepath.Join(dir, "mkimage.json"))
	if err != nil {
		return nil, err
	}
	var meta cacheMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, fmt.Errorf("%s/mkimage.json: %w", dir, err)
	}
	for _, l := range meta.Layers {
		fi, err := os.Stat(filepath.Join(dir, "blobs", "sha256", l.Digest.Hex))
		if err != nil {
			return nil, err
		}
		if fi.Size() != l.Size {
			return nil, fmt.Errorf("blob %s has size %d, want %d", l.Digest, fi.Size(), l.Size)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", meta.Manifest.Hex)); err != nil {
		return nil, err
	}
	return &meta, nil
}
