package main

import (
	"archive/tar"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"path"
	"sort"
	"strings"
	"time"
)

// epoch is the modification time of every entry, so that layers are
// reproducible.
var epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// entry is one planned tar entry. Content is generated when the layer is
// written, from (kind, size, seed).
type entry struct {
	name string // relative, no leading or trailing slash
	typ  byte   // tar.TypeDir, TypeReg, TypeSymlink, TypeLink
	mode int64
	uid  int
	size int64
	kind contentKind
	seed uint64
	data []byte // kindLiteral
	link string // symlink target, or hardlink target name
}

// layerPlan is the full, ordered content of one layer.
type layerPlan struct {
	name    string
	entries []entry
}

func (lp *layerPlan) counts() (files, entries int, bytes int64) {
	for _, e := range lp.entries {
		if e.typ == tar.TypeReg {
			files++
			bytes += e.size
		}
	}
	return files, len(lp.entries), bytes
}

// finish adds missing parent directories, sorts the entries in walk order
// (a directory before its contents) and makes every hardlink come after its
// target.
func (lp *layerPlan) finish() {
	have := map[string]bool{}
	kept := lp.entries[:0]
	for _, e := range lp.entries {
		if e.typ == tar.TypeDir {
			if have[e.name] {
				continue // the same directory from two trees
			}
			have[e.name] = true
		}
		kept = append(kept, e)
	}
	lp.entries = kept
	var extra []entry
	for _, e := range lp.entries {
		for d := path.Dir(e.name); d != "." && d != "/" && !have[d]; d = path.Dir(d) {
			have[d] = true
			extra = append(extra, entry{name: d, typ: tar.TypeDir, mode: 0o755})
		}
	}
	lp.entries = append(lp.entries, extra...)
	sort.SliceStable(lp.entries, func(i, j int) bool { return walkLess(lp.entries[i].name, lp.entries[j].name) })
	idx := map[string]int{}
	for i, e := range lp.entries {
		idx[e.name] = i
	}
	for i := range lp.entries {
		e := &lp.entries[i]
		if e.typ != tar.TypeLink {
			continue
		}
		j, ok := idx[e.link]
		if !ok {
			panic(fmt.Sprintf("hardlink %s to missing %s", e.name, e.link)) // a bug in a plan, not user input
		}
		if j > i { // swap roles: the earlier name holds the content
			t := &lp.entries[j]
			linkName, targetName := e.name, t.name
			*e, *t = *t, *e
			e.name, t.name = linkName, targetName
			t.link = linkName
		}
	}
}

// walkLess orders paths as a depth-first walk with sorted names does.
func walkLess(a, b string) bool {
	return strings.ReplaceAll(a, "/", "\x00") < strings.ReplaceAll(b, "/", "\x00")
}

// writeTar writes the layer as a tar stream.
func (lp *layerPlan) writeTar(w io.Writer) error {
	tw := tar.NewWriter(w)
	scratch := make([]byte, 0, 128<<10)
	for _, e := range lp.entries {
		h := &tar.Header{
			Typeflag: e.typ,
			Name:     e.name,
			Mode:     e.mode,
			Uid:      e.uid,
			Gid:      e.uid,
			ModTime:  epoch,
			Format:   tar.FormatPAX,
		}
		if e.uid == 0 {
			h.Uname, h.Gname = "root", "root"
		}
		switch e.typ {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeReg:
			h.Size = e.size
		case tar.TypeSymlink, tar.TypeLink:
			h.Linkname = e.link
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("%s: %w", e.name, err)
		}
		if e.typ != tar.TypeReg || e.size == 0 {
			continue
		}
		if e.kind == kindLiteral {
			if _, err := tw.Write(e.data); err != nil {
				return err
			}
			continue
		}
		var err error
		scratch, err = generate(tw, e.kind, e.size, e.seed, scratch)
		if err != nil {
			return err
		}
	}
	return tw.Close()
}

// literal returns a regular-file entry with the given content.
func literal(name string, mode int64, data string) entry {
	return entry{name: name, typ: tar.TypeReg, mode: mode, size: int64(len(data)), kind: kindLiteral, data: []byte(data)}
}

func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }

// sizeDist is a clamped log-normal file size distribution.
type sizeDist struct {
	median   float64
	sigma    float64
	min, max int64
}

func (d sizeDist) draw(r *rand.Rand) int64 {
	v := int64(d.median * math.Exp(d.sigma*r.NormFloat64()))
	return max(d.min, min(d.max, v))
}

// treeSpec describes a generated directory tree of similar files.
type treeSpec struct {
	root     string
	files    int
	perDir   int // average files per directory
	maxDepth int // below root
	kind     contentKind
	exts     []string
	sizes    sizeDist
	mode     int64
	uid      int
	// links: fraction of files that get a "versioned" symlink chain
	// (libx.so -> libx.so.1 -> libx.so.1.2.3), as shared libraries do.
	soChains float64
	// hardlinks: number of extra hardlinks to files of this tree.
	hardlinks int
}

// planner builds layer plans from one seeded PRNG, so that names and sizes
// are a function of the seed and the order of calls only.
type planner struct {
	r     *rand.Rand
	names map[string]bool // all paths planned so far in the current layer
}

func newPlanner(seed uint64) *planner {
	return &planner{r: rand.New(rand.NewPCG(seed, 0x6d6b696d616765)), names: map[string]bool{}}
}

func (p *planner) unique(name string) string {
	if !p.names[name] {
		p.names[name] = true
		return name
	}
	ext := path.Ext(name)
	base := strings.TrimSuffix(name, ext)
	for i := 2; ; i++ {
		n := fmt.Sprintf("%s-%d%s", base, i, ext)
		if !p.names[n] {
			p.names[n] = true
			return n
		}
	}
}

// tree appends the entries of spec to lp, with total regular-file bytes
// scaled to targetBytes (0: as drawn).
func (p *planner) tree(lp *layerPlan, spec treeSpec, targetBytes int64) {
	r := p.r
	ndirs := max(1, spec.files/max(1, spec.perDir))
	if spec.maxDepth == 0 {
		ndirs = 1
	}
	type d struct {
		name  string
		depth int
	}
	dirs := []d{{spec.root, 0}}
	for len(dirs) < ndirs {
		// Prefer recent directories as parents: gives realistic depth.
		var parent d
		if r.IntN(3) > 0 {
			parent = dirs[len(dirs)-1-r.IntN(min(len(dirs), 8))]
		} else {
			parent = dirs[r.IntN(len(dirs))]
		}
		if parent.depth >= spec.maxDepth {
			continue
		}
		name := word(r)
		if r.IntN(3) == 0 {
			name += "_" + word(r)
		}
		dirs = append(dirs, d{p.unique(parent.name + "/" + name), parent.depth + 1})
	}
	for _, x := range dirs {
		lp.entries = append(lp.entries, entry{name: x.name, typ: tar.TypeDir, mode: 0o755, uid: spec.uid})
	}
	mode := spec.mode
	if mode == 0 {
		mode = 0o644
	}
	first := len(lp.entries)
	var total int64
	for i := 0; i < spec.files; i++ {
		parent := dirs[r.IntN(len(dirs))].name
		base := word(r)
		if r.IntN(2) == 0 {
			base += "_" + word(r)
		}
		ext := spec.exts[r.IntN(len(spec.exts))]
		size := spec.sizes.draw(r)
		total += size
		lp.entries = append(lp.entries, entry{
			name: p.unique(parent + "/" + base + ext), typ: tar.TypeReg, mode: mode, uid: spec.uid,
			size: size, kind: spec.kind, seed: r.Uint64(),
		})
	}
	if targetBytes > 0 && total > 0 {
		f := float64(targetBytes) / float64(total)
		for i := first; i < len(lp.entries); i++ {
			if e := &lp.entries[i]; e.typ == tar.TypeReg {
				e.size = max(1, int64(float64(e.size)*f))
			}
		}
	}
	var links []entry
	for i := first; i < first+spec.files; i++ {
		e := &lp.entries[i]
		if spec.soChains <= 0 || r.Float64() >= spec.soChains {
			continue
		}
		// name.so.MAJ.MIN, with symlinks name.so.MAJ -> name.so.MAJ.MIN and
		// name.so -> name.so.MAJ, as installed shared libraries have.
		maj := fmt.Sprintf("%s.%d", e.name, 1+r.IntN(3))
		full := fmt.Sprintf("%s.%d", maj, r.IntN(20))
		if p.names[maj] || p.names[full] {
			continue
		}
		p.names[maj], p.names[full] = true, true
		links = append(links,
			entry{name: maj, typ: tar.TypeSymlink, mode: 0o777, link: path.Base(full)},
			entry{name: e.name, typ: tar.TypeSymlink, mode: 0o777, link: path.Base(maj)})
		e.name = full
	}
	lp.entries = append(lp.entries, links...)

	for i := 0; i < spec.hardlinks; i++ {
		t := lp.entries[first+r.IntN(spec.files)]
		if t.typ != tar.TypeReg {
			continue
		}
		lp.entries = append(lp.entries, entry{name: p.unique(path.Dir(t.name) + "/" + word(r) + "-" + word(r) + path.Ext(t.name)), typ: tar.TypeLink, mode: t.mode, link: t.name})
	}
}

// regularFiles returns the names of the regular files in the plan.
func (lp *layerPlan) regularFiles() []string {
	var out []string
	for _, e := range lp.entries {
		if e.typ == tar.TypeReg {
			out = append(out, e.name)
		}
	}
	return out
}
