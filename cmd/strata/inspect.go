package main

import (
	"container/heap"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/layercache/commit"
)

func init() {
	register(&command{
		name:    "inspect",
		args:    "IMAGE",
		summary: "Show what each layer of a cached image adds, changes and deletes, and the bytes it wastes",
		help:    inspectHelp,
		flags:   inspectFlags,
	})
}

const inspectHelp = `IMAGE is a reference as 'strata ls' prints it (tag or digest form), or the
digest it resolved to (sha256:HEX, or a unique prefix of at least 12 hex
digits). Only the node's cache is read: the registry is never contacted.

Per layer, bottom first: its regular-file bytes and count, and the paths it
adds (A: nothing below has the path), changes (C: a lower layer has the path;
an opaque directory over a lower one counts too) and deletes (D: a whiteout
of a lower path, or a lower path an opaque directory hides; a deleted
directory counts once), with the bytes of the files it adds and changes, and
the lower bytes it deletes. A directory that a lower layer has too is merged,
not changed, and is not counted. HIDES is the lower bytes the layer makes
invisible by changing or deleting them.

Wasted bytes are the sizes of the file copies that a higher layer overwrites
or deletes, each hidden copy counted; the efficiency is 1 - wasted/total,
where total is the file content of all layers, every copy counted. (dive
counts differently: its wasted bytes are all copies of a path that is in more
than one layer, the visible one included, and its score is the sum of each
path's smallest copy over the sum of all copies.) A hardlink's bytes count
once per layer, on the first of its names the walk meets. Sizes are the
files' lengths. The walk reads directories and lstats their entries only.
`

// The JSON document of `strata inspect --json`. Its field names are part of
// the CLI's contract with scripts (docs/layercache.md).
type (
	inspectJSON struct {
		Ref          string `json:"ref"`
		Digest       string `json:"digest"` // what Ref resolved to (manifest or index)
		ArtifactType string `json:"artifactType,omitempty"`
		// Layers bottom first.
		Layers []inspectLayerJSON `json:"layers"`
		// TotalBytes is the file content of all layers, every copy counted;
		// WastedBytes the copies that a higher layer hides; Efficiency is
		// 1 - WastedBytes/TotalBytes (1 for an empty image).
		TotalBytes  int64   `json:"totalBytes"`
		WastedBytes int64   `json:"wastedBytes"`
		Efficiency  float64 `json:"efficiency"`
		// Wasted lists the paths that waste the most bytes (--top), most
		// first.
		Wasted []wastedJSON `json:"wasted"`
	}
	inspectLayerJSON struct {
		Index  int    `json:"index"` // 1 is the bottom layer
		DiffID string `json:"diffID"`
		// Kind is "layer" (an image's layer), "artifact-tar" (an
		// artifact's tar layer) or "files" (the tree of an artifact's
		// files).
		Kind           string            `json:"kind"`
		CompressedSize int64             `json:"compressedSize"`
		Size           int64             `json:"size"`  // regular-file bytes
		Files          int64             `json:"files"` // regular files
		Added          countJSON         `json:"added"`
		Changed        countJSON         `json:"changed"`
		Deleted        countJSON         `json:"deleted"`
		HiddenBytes    int64             `json:"hiddenBytes"`
		Changes        []layerChangeJSON `json:"changes,omitempty"` // with --files, by path
	}
	countJSON struct {
		Paths int64 `json:"paths"`
		Bytes int64 `json:"bytes"`
	}
	layerChangeJSON struct {
		Kind string `json:"kind"` // A, C or D, as strata diff
		Path string `json:"path"`
		// Size is the file's for A and C, the lower bytes removed for D.
		Size int64 `json:"size"`
	}
	wastedJSON struct {
		Path   string `json:"path"`
		Copies int64  `json:"copies"` // hidden copies of the path
		Bytes  int64  `json:"bytes"`  // their bytes
	}
)

func inspectFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	asJSON := fs.Bool("json", false, "print JSON (docs/layercache.md names its fields)")
	files := fs.Bool("files", false, "list each layer's added, changed and deleted paths with their sizes")
	top := fs.Int("top", 10, "list this many of the paths that waste the most bytes")
	exact := fs.Bool("bytes", false, "print exact byte counts instead of human units")
	return func(ctx context.Context, e *env, args []string) error {
		cmd := commands["inspect"]
		if len(args) != 1 {
			return usagef(cmd, "inspect takes one image (a reference or a digest), got %d arguments", len(args))
		}
		if *top < 0 {
			return usagef(cmd, "--top must not be negative, got %d", *top)
		}
		// No registry option: inspect reads the cache alone, and nothing it
		// calls reaches a registry.
		s, err := e.open()
		if err != nil {
			return err
		}
		im, err := findCachedImage(cmd, s, e.root, args[0])
		if err != nil {
			return err
		}
		rep, err := inspectImage(ctx, s, im, *files, *top)
		if err != nil {
			return fmt.Errorf("inspect %s: %w", im.Ref, err)
		}
		if *asJSON {
			enc := json.NewEncoder(e.stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(rep)
		}
		size := humanBytes
		if *exact {
			size = func(n int64) string { return strconv.FormatInt(n, 10) }
		}
		return printInspect(e.stdout, rep, size)
	}
}

// findCachedImage picks the cached image that arg names: a reference as
// recorded (or as it parses to), or a digest or a unique prefix of one.
func findCachedImage(cmd *command, s *layercache.Store, root, arg string) (*layercache.ImageInfo, error) {
	images, err := s.Images()
	if err != nil {
		return nil, fmt.Errorf("list the cached images: %w", err)
	}
	pick := func(im *layercache.ImageInfo) (*layercache.ImageInfo, error) {
		if !im.Complete {
			return nil, fmt.Errorf("%w: %s is only partly in the cache (its manifest or some layers are gone, pruned or evicted): pull it again with 'strata pull %s'",
				layercache.ErrNotCached, im.Ref, im.Ref)
		}
		return im, nil
	}
	for i := range images {
		if images[i].Ref == arg {
			return pick(&images[i])
		}
	}
	// As the store records it: "ubuntu" is index.docker.io/library/ubuntu:latest.
	var digest string
	if r, err := s.ParseReference(arg); err == nil {
		for i := range images {
			if images[i].Ref == r.Name() {
				return pick(&images[i])
			}
		}
		if d, ok := r.(name.Digest); ok {
			digest = d.DigestStr()
		}
	}
	// A digest, or a prefix of one: sha256:HEX, or 12 hex digits or more.
	hex, prefixed := strings.CutPrefix(arg, "sha256:")
	if digest != "" {
		hex, prefixed = strings.TrimPrefix(digest, "sha256:"), true
	}
	if isHex(hex) && (prefixed || len(hex) >= 12) {
		if len(hex) < 12 {
			return nil, usagef(cmd, "digest prefix %q is too short: give at least 12 hex digits", arg)
		}
		var found []*layercache.ImageInfo
		for i := range images {
			if strings.HasPrefix(images[i].Digest.Hex, hex) &&
				!slices.ContainsFunc(found, func(f *layercache.ImageInfo) bool { return f.Digest == images[i].Digest }) {
				found = append(found, &images[i])
			}
		}
		switch len(found) {
		case 1:
			return pick(found[0])
		case 0:
		default:
			var ds []string
			for _, f := range found {
				ds = append(ds, f.Digest.String()+" ("+f.Ref+")")
			}
			return nil, usagef(cmd, "digest prefix %q names %d cached images: %s; give more digits", arg, len(found), strings.Join(ds, ", "))
		}
	}
	return nil, fmt.Errorf("%w: %s is not in the cache at %s (inspect reads the cache only): pull it with 'strata pull %s', or see 'strata ls' for the cached images",
		layercache.ErrNotCached, arg, root, arg)
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return s != ""
}

// How inspect merges layers. The merged view of the layers so far is a tree
// of nodes, one per path ever seen, keyed by name in its parent; deleted
// paths stay as tombstones, so that a path deleted and added again keeps its
// wasted bytes. It costs about 100 bytes per path plus the name (measured by
// TestInspectTreeCost): a node, its slot in its parent's map, and a map per
// directory. Nothing else grows with the image, except the change lists
// that --files asks for (about 50 bytes per change plus the path).

type nodeKind uint8

const (
	gone nodeKind = iota // deleted: a tombstone that keeps its wasted bytes
	dirNode
	fileNode  // a regular file
	otherNode // a symlink, fifo, socket or device: no content bytes
)

type node struct {
	children map[string]*node // dirNode only (a tombstone may keep its own)
	size     int64            // fileNode: its content bytes
	wasted   int64            // bytes of hidden copies of this path
	copies   int32            // hidden copies of this path (regular files)
	layer    int32            // the top layer that has the path
	kind     nodeKind
}

func (n *node) live() bool { return n != nil && n.kind != gone }

// layerStats is what one layer does to the view below it.
type layerStats struct {
	size, files             int64
	added, changed, deleted countJSON
	hidden                  int64
	changes                 []layerChangeJSON
}

// merger walks layers bottom first into the merged view.
type merger struct {
	ctx   context.Context // checked once per directory
	root  *node
	layer int32
	st    *layerStats
	files bool                   // keep change lists
	links map[[2]uint64]struct{} // this layer's inodes with more than one name
}

// hide marks n and everything live below it as deleted, counts each hidden
// regular file as a wasted copy of its path, and returns their bytes.
func hide(n *node) int64 {
	var b int64
	switch n.kind {
	case fileNode:
		n.copies++
		n.wasted += n.size
		b = n.size
	case dirNode:
		for _, c := range n.children {
			if c.live() {
				b += hide(c)
			}
		}
	}
	n.kind, n.size = gone, 0
	return b
}

func (m *merger) change(op, path string, size int64) {
	if m.files {
		m.st.changes = append(m.st.changes, layerChangeJSON{Kind: op, Path: path, Size: size})
	}
}

// walkDir merges the layer directory f (at path p, merged node n) into the
// view. opaque is true when this directory, or one above it in this layer,
// is opaque and replaced a lower directory: nothing below it shows through.
func (m *merger) walkDir(f *os.File, p string, n *node, opaque bool) error {
	if err := m.ctx.Err(); err != nil {
		return err
	}
	// f owns the descriptor; fd is for the *at calls.
	fd := int(f.Fd())
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read directory %s: %w", p, err)
	}
	slices.Sort(names)
	if n.children == nil {
		n.children = map[string]*node{}
	}
	for _, nm := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, nm, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("lstat %s/%s: %w", p, nm, err)
		}
		q := p + "/" + nm
		if p == "/" {
			q = "/" + nm
		}
		old := n.children[nm]
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			if commit.IsWhiteout(&st) {
				// The lower path is deleted.
				if old.live() {
					b := hide(old)
					m.st.deleted.Paths++
					m.st.deleted.Bytes += b
					m.st.hidden += b
					m.change("D", q, b)
				}
				continue
			}
		case unix.S_IFDIR:
			if err := m.dir(fd, nm, q, n, old, opaque); err != nil {
				return err
			}
			continue
		}
		m.nonDir(&st, nm, q, n, old)
	}
	if opaque {
		// What the lower layers have here and this layer does not: hidden.
		for _, nm := range sortedKeys(n.children) {
			c := n.children[nm]
			if c.live() && c.layer < m.layer {
				b := hide(c)
				m.st.deleted.Paths++
				m.st.deleted.Bytes += b
				m.st.hidden += b
				q := p + "/" + nm
				if p == "/" {
					q = "/" + nm
				}
				m.change("D", q, b)
			}
		}
	}
	return nil
}

// dir merges the directory nm of the layer directory fd.
func (m *merger) dir(fd int, nm, q string, parent, old *node, opaque bool) error {
	cfd, err := unix.Openat(fd, nm, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", q, err)
	}
	f := os.NewFile(uintptr(cfd), q)
	defer f.Close()
	own, err := commit.DirOpaque(cfd)
	if err != nil {
		return fmt.Errorf("read trusted.overlay.opaque of %s: %w", q, err)
	}
	switch {
	case old.live() && old.kind == dirNode:
		if opaque || own {
			// The lower directory is replaced, not merged.
			m.st.changed.Paths++
			m.change("C", q, 0)
			opaque = true
		}
	case old.live():
		b := hide(old) // a file or symlink becomes a directory
		m.st.changed.Paths++
		m.st.hidden += b
		m.change("C", q, 0)
	default:
		m.st.added.Paths++
		m.change("A", q, 0)
	}
	if old == nil {
		old = &node{}
		parent.children[nm] = old
	}
	old.kind, old.size, old.layer = dirNode, 0, m.layer
	return m.walkDir(f, q, old, opaque)
}

// nonDir merges a regular file, symlink or other non-directory.
func (m *merger) nonDir(st *unix.Stat_t, nm, q string, parent, old *node) {
	kind, size := otherNode, int64(0)
	if st.Mode&unix.S_IFMT == unix.S_IFREG {
		kind, size = fileNode, st.Size
		dup := false
		if st.Nlink > 1 {
			// A hardlink's bytes count once per layer, on the first of
			// its names that the walk meets.
			k := [2]uint64{st.Dev, st.Ino}
			if _, dup = m.links[k]; dup {
				size = 0
			} else {
				m.links[k] = struct{}{}
			}
		}
		if !dup {
			m.st.files++
		}
		m.st.size += size
	}
	if old.live() {
		b := hide(old)
		m.st.changed.Paths++
		m.st.changed.Bytes += size
		m.st.hidden += b
		m.change("C", q, size)
	} else {
		m.st.added.Paths++
		m.st.added.Bytes += size
		m.change("A", q, size)
	}
	if old == nil {
		old = &node{}
		parent.children[nm] = old
	}
	// A directory replaced by a file keeps its children as tombstones,
	// with their wasted bytes.
	old.kind, old.size, old.layer = kind, size, m.layer
}

func sortedKeys(m map[string]*node) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// mergeLayer walks one layer directory (its fs/) into the view.
func (m *merger) mergeLayer(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(fd), dir)
	defer f.Close()
	m.links = map[[2]uint64]struct{}{}
	m.root.layer = m.layer
	// The root of a lower directory is never opaque to overlayfs: the
	// mount's root merges every layer.
	return m.walkDir(f, "/", m.root, false)
}

// inspectImage walks the layers of a cached image bottom first.
func inspectImage(ctx context.Context, s *layercache.Store, im *layercache.ImageInfo, files bool, top int) (*inspectJSON, error) {
	metas := map[v1.Hash]layercache.LayerInfo{}
	all, err := s.Layers()
	if err != nil {
		return nil, fmt.Errorf("list the cached layers: %w", err)
	}
	for _, l := range all {
		metas[l.DiffID] = l
	}
	rep := &inspectJSON{Ref: im.Ref, Digest: im.Digest.String(), ArtifactType: im.ArtifactType,
		Layers: []inspectLayerJSON{}, Wasted: []wastedJSON{}}
	m := &merger{ctx: ctx, root: &node{kind: dirNode}, files: files}
	for i, d := range im.Layers {
		meta, ok := metas[d]
		if !ok {
			return nil, fmt.Errorf("%w: layer %s is not in the cache any more (pruned or evicted): pull the image again with 'strata pull %s'",
				layercache.ErrNotCached, d, im.Ref)
		}
		dir, err := s.LayerDir(d)
		if err != nil {
			return nil, err
		}
		var st layerStats
		m.st, m.layer = &st, int32(i+1)
		if err := m.mergeLayer(dir); err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i+1, d, err)
		}
		slices.SortStableFunc(st.changes, func(a, b layerChangeJSON) int { return strings.Compare(a.Path, b.Path) })
		kind := "layer"
		switch meta.Kind {
		case "":
		case "tree":
			kind = "files"
		default:
			kind = meta.Kind
		}
		rep.Layers = append(rep.Layers, inspectLayerJSON{Index: i + 1, DiffID: d.String(), Kind: kind,
			CompressedSize: meta.CompressedSize, Size: st.size, Files: st.files,
			Added: st.added, Changed: st.changed, Deleted: st.deleted, HiddenBytes: st.hidden, Changes: st.changes})
		rep.TotalBytes += st.size
		rep.WastedBytes += st.hidden
	}
	rep.Efficiency = 1
	if rep.TotalBytes > 0 {
		// 1 - wasted/total, as the bytes that stay visible over all.
		rep.Efficiency = float64(rep.TotalBytes-rep.WastedBytes) / float64(rep.TotalBytes)
	}
	rep.Wasted = topWasted(m.root, top)
	return rep, nil
}

// wastedHeap keeps the top paths by wasted bytes, the least on top.
type wastedHeap []wastedJSON

func (h wastedHeap) Len() int           { return len(h) }
func (h wastedHeap) Less(i, j int) bool { return worse(h[j], h[i]) }
func (h wastedHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *wastedHeap) Push(x any)        { *h = append(*h, x.(wastedJSON)) }
func (h *wastedHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// worse orders wasted paths: more bytes first, then by path.
func worse(a, b wastedJSON) bool {
	if a.Bytes != b.Bytes {
		return a.Bytes > b.Bytes
	}
	return a.Path < b.Path
}

// topWasted lists the n paths of the view that waste the most bytes.
func topWasted(root *node, n int) []wastedJSON {
	h := &wastedHeap{}
	if n == 0 {
		return []wastedJSON{}
	}
	var visit func(p string, nd *node)
	visit = func(p string, nd *node) {
		if nd.wasted > 0 {
			w := wastedJSON{Path: p, Copies: int64(nd.copies), Bytes: nd.wasted}
			if h.Len() < n {
				heap.Push(h, w)
			} else if worse(w, (*h)[0]) {
				(*h)[0] = w
				heap.Fix(h, 0)
			}
		}
		for nm, c := range nd.children {
			visit(strings.TrimSuffix(p, "/")+"/"+nm, c)
		}
	}
	visit("/", root)
	out := []wastedJSON(*h)
	slices.SortFunc(out, func(a, b wastedJSON) int {
		if worse(a, b) {
			return -1
		}
		return 1
	})
	return out
}

func printInspect(w io.Writer, rep *inspectJSON, size func(int64) string) error {
	fmt.Fprintf(w, "image   %s\ndigest  %s\n", rep.Ref, rep.Digest)
	artifact := rep.ArtifactType != ""
	if artifact {
		fmt.Fprintf(w, "artifact %s\n", rep.ArtifactType)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "LAYER\tDIFFID\tSIZE\tFILES\tADDED\tCHANGED\tDELETED\tHIDES"
	if artifact {
		head += "\tKIND"
	}
	fmt.Fprintln(tw, head)
	for _, l := range rep.Layers {
		d, _ := v1.NewHash(l.DiffID)
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d (%s)\t%d (%s)\t%d (%s)\t%s", l.Index, shortDigest(d), size(l.Size), l.Files,
			l.Added.Paths, size(l.Added.Bytes), l.Changed.Paths, size(l.Changed.Bytes), l.Deleted.Paths, size(l.Deleted.Bytes), size(l.HiddenBytes))
		if artifact {
			fmt.Fprintf(tw, "\t%s", l.Kind)
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprintln(tw)
	fmt.Fprintf(tw, "total\t%s\tfile content in %d layers, every copy counted\n", size(rep.TotalBytes), len(rep.Layers))
	fmt.Fprintf(tw, "wasted\t%s\tcopies that a higher layer overwrites or deletes\n", size(rep.WastedBytes))
	fmt.Fprintf(tw, "efficiency\t%.2f %%\t1 - wasted/total\n", 100*rep.Efficiency)
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(rep.Wasted) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "WASTED PATH\tCOPIES\tBYTES")
		for _, x := range rep.Wasted {
			fmt.Fprintf(tw, "%s\t%d\t%s\n", x.Path, x.Copies, size(x.Bytes))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	for _, l := range rep.Layers {
		if l.Changes == nil {
			continue
		}
		fmt.Fprintf(tw, "\nlayer %d %s\n", l.Index, l.DiffID)
		for _, c := range l.Changes {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Kind, size(c.Size), c.Path)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}
