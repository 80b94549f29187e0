package layercache

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
	"github.com/strata-csi/strata/layercache/unpack"
)

// How an artifact's raw files are kept (see docs/layercache.md):
//
//   - each raw layer is an entry of its own, layers/sha256/<entryKey>/fs/blob,
//     fetched straight into that file while hashing and renamed into layers/
//     only after its digest verified; its access record is a layer's;
//   - the artifact's tree, layers/sha256/<treeKey>/fs/, holds a hardlink of
//     each raw file at its path, so that a model of a thousand files is one
//     overlay lower. Two models sharing a shard link the same inode.
//
// References: owners hold the tree (it is what the driver mounts); a raw
// entry is in use while any tree links it, which its link count tells
// without reading any tree (a raw entry's blob has one link of its own).
// Its bytes are counted once: on the raw entry; the tree counts only its
// entries.

// rawBlobFile is a raw entry's file, under its fs/ directory.
const rawBlobFile = "blob"

// TreeOwner is the owner that Layers reports for a raw file that a cached
// artifact tree links.
const TreeOwner = "(linked by a cached artifact tree)"

// fetchLayers lists what Ensure fetches for img: its image and tar layers
// and, when img holds its tree, the tree's raw files.
func (img *Image) fetchLayers() []Layer {
	var out []Layer
	tree := false
	for _, l := range img.Layers {
		if l.kind == artifactTree {
			tree = true
			continue
		}
		out = append(out, l)
	}
	if tree {
		for _, f := range img.Files {
			out = append(out, f.Layer)
		}
	}
	return out
}

// writeRaw copies a raw layer's blob from r into file, within the layer's
// limits. The caller verifies the digest.
func writeRaw(r *verifyReader, file, what string, meter *layerMeter) (unpack.Stats, error) {
	if err := meter.Entry(); err != nil {
		return unpack.Stats{}, fmt.Errorf("%s (nothing of it was kept): %w", what, err)
	}
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return unpack.Stats{}, err
	}
	// No ReadFrom: a plain copy with a buffer of up to 1 MiB (no larger
	// than the file: a model of a thousand small files must not churn
	// a gigabyte of buffers), counted as it goes.
	buf := make([]byte, min(max(r.limit, 32<<10), 1<<20))
	n, err := io.CopyBuffer(struct{ io.Writer }{f}, &meteredReader{r: r, m: meter}, buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if errors.Is(err, ErrNoSpace) {
			return unpack.Stats{}, fmt.Errorf("%s (nothing of it was kept): %w", what, err)
		}
		return unpack.Stats{}, r.failure(err, what)
	}
	return unpack.Stats{Bytes: n, Files: 1, Entries: 1}, nil
}

// meteredReader charges what it reads as a layer's content.
type meteredReader struct {
	r io.Reader
	m *layerMeter
}

func (m *meteredReader) Read(p []byte) (int, error) {
	n, err := m.r.Read(p)
	if n > 0 {
		if cerr := m.m.Content(int64(n)); cerr != nil {
			return n, cerr
		}
	}
	return n, err
}

// ensureTree builds img's tree of raw files if img has one and it is not in
// the store: hardlinks of the raw entries' files at their paths, made in
// the work directory and renamed into layers/. Every raw entry must be in
// the store.
func (s *Store) ensureTree(img *Image) error {
	var tree *Layer
	for i := range img.Layers {
		if img.Layers[i].kind == artifactTree {
			tree = &img.Layers[i]
		}
	}
	if tree == nil || s.HasLayer(tree.DiffID) {
		return nil
	}
	start := time.Now()
	dst, err := s.layerPath(tree.DiffID)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(s.work, "tree-"+tree.DiffID.Hex[:12]+"-")
	if err != nil {
		return err
	}
	defer func() {
		if tmp != "" {
			if rerr := os.RemoveAll(tmp); rerr != nil {
				klog.ErrorS(rerr, "Could not remove a failed tree's files", "path", tmp)
			}
		}
	}()
	entries, err := s.linkTree(filepath.Join(tmp, fsDir), img.Files)
	if err != nil {
		return fmt.Errorf("build the file tree of %s: %w", img.Ref, err)
	}
	meta := LayerMeta{DiffID: tree.DiffID, Digest: tree.DiffID, MediaType: treeMediaType, Kind: kindTree,
		Files: int64(len(img.Files)), Entries: entries, Created: time.Now().UTC()}
	for _, f := range img.Files {
		meta.Parts = append(meta.Parts, f.Layer.DiffID)
	}
	data, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, metaFile), data, 0o644); err != nil {
		return err
	}
	// No blob produces a tree: an image that names its key as a diffID gets
	// it with no digest whatever (its files' access is checked on them).
	if err := os.WriteFile(filepath.Join(tmp, accessFile), []byte(`{"digests":[]}`), 0o644); err != nil {
		return err
	}
	if err := syncFS(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTEMPTY) {
			return nil // another Ensure committed the same tree first
		}
		return fmt.Errorf("commit the file tree of %s: %w", img.Ref, err)
	}
	tmp = ""
	if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
		return err
	}
	klog.V(1).InfoS("Artifact tree built", "image", img.Ref, "layer", tree.DiffID, "files", len(img.Files),
		"duration", time.Since(start).Round(time.Millisecond))
	return nil
}

// maxTreeFDs bounds the directory descriptors linkTree keeps open.
const maxTreeFDs = 256

// linkTree creates root and a hardlink of each file's raw entry at its
// path under it, creating directories on the way, and returns how many
// entries it made. Every name is created relative to its directory's
// descriptor, and every directory is opened with RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS, so nothing is followed out of root.
func (s *Store) linkTree(root string, files []RawFile) (int64, error) {
	if err := os.Mkdir(root, 0o755); err != nil {
		return 0, err
	}
	rootFD, err := unix.Open(root, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(rootFD)
	fds := map[string]int{}
	closeAll := func() {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
		clear(fds)
	}
	defer closeAll()
	var entries int64
	var dirFD func(d string) (int, error)
	dirFD = func(d string) (int, error) {
		if d == "." {
			return rootFD, nil
		}
		if fd, ok := fds[d]; ok {
			return fd, nil
		}
		parent, err := dirFD(path.Dir(d))
		if err != nil {
			return -1, err
		}
		name := path.Base(d)
		switch err := unix.Mkdirat(parent, name, 0o755); {
		case err == nil:
			entries++
		case !errors.Is(err, unix.EEXIST):
			return -1, &os.PathError{Op: "mkdir", Path: d, Err: err}
		}
		fd, err := unix.Openat2(parent, name, &unix.OpenHow{
			Flags:   unix.O_DIRECTORY | unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS,
		})
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: d, Err: err}
		}
		if len(fds) >= maxTreeFDs {
			closeAll()
		}
		fds[d] = fd
		return fd, nil
	}
	for _, f := range files {
		dir, err := dirFD(path.Dir(f.Path))
		if err != nil {
			return 0, err
		}
		src, err := s.rawPath(f.Layer.DiffID)
		if err != nil {
			return 0, err
		}
		if err := unix.Linkat(unix.AT_FDCWD, src, dir, path.Base(f.Path), 0); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return 0, fmt.Errorf("%w: raw file %s (blob %s) for %q was removed meanwhile: retry", ErrLayerMissing, f.Layer.DiffID, f.Layer.Digest, f.Path)
			}
			return 0, &os.LinkError{Op: "link", Old: src, New: f.Path, Err: err}
		}
		entries++
	}
	return entries, nil
}

// rawPath is the file of a raw entry.
func (s *Store) rawPath(key v1.Hash) (string, error) {
	p, err := s.layerPath(key)
	if err != nil {
		return "", err
	}
	return filepath.Join(p, fsDir, rawBlobFile), nil
}

// linkedByTree reports whether a cached tree (or one being built) links
// the raw entry key.
func (s *Store) linkedByTree(key v1.Hash) bool {
	p, err := s.rawPath(key)
	if err != nil {
		return false
	}
	var st unix.Stat_t
	return unix.Lstat(p, &st) == nil && st.Nlink > 1
}
