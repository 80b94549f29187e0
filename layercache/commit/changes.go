package commit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// ChangeKind says how a path of a volume differs from its image, in docker
// diff's letters.
type ChangeKind string

// The kinds of change.
const (
	Added   ChangeKind = "A" // the path is new
	Changed ChangeKind = "C" // the path was in the image and was written to (or replaced)
	Deleted ChangeKind = "D" // the path was in the image and is gone
)

// Change is one path in which a volume differs from its image.
type Change struct {
	// Path is the path in the volume's tree, with a leading "/".
	Path string
	Kind ChangeKind
	// Type is what the path is (Added, Changed) or was (Deleted): "file",
	// "dir", "symlink", "fifo", "socket", "chardev" or "blockdev".
	Type string
	// Size is, for Added and Changed, the length of a regular file or of a
	// symlink's target in the upper directory, from stat; 0 otherwise.
	Size int64
}

// ChangeStats sums up a list of changes.
type ChangeStats struct {
	Added, Changed, Deleted int
	// Bytes is the length of the regular files in the upper directory,
	// each inode counted once: the data the volume's writes hold.
	Bytes int64
}

// Changes calls emit with each path in which the overlay of the upper
// directory upper over the layer directories lowers (bottom first, as a
// volume record lists its layers) differs from the lowers alone, in the
// order of the paths as strings (docker diff's order), as docker diff tells
// what a container changed in its image:
//
//   - an upper entry (other than a whiteout) is Changed if the lowers' merged
//     tree has its path (the top-most layer that has it wins, and a layer's
//     whiteouts and opaque directories hide what lies below), else Added;
//     its parent directories are in the upper too, so they show as well;
//   - a whiteout is Deleted if the lowers have its path; a deleted
//     directory is listed once, not its content;
//   - an opaque directory of the upper hides the lowers' entries under it:
//     each one that the upper does not have again is Deleted.
//
// It reads the upper in place and copies nothing. Only directories are
// opened, with O_DIRECTORY|O_NOFOLLOW, relative to their parent's fd: a pod
// that writes meanwhile cannot make it follow a symlink out of the upper,
// and no FIFO, device or socket is ever opened (sizes come from fstatat).
// What the pod changes during the walk may or may not be seen. The lowers
// are the cache's read-only layers, read by path. Memory grows with the
// entries of the directories being walked, not with the number of changes:
// they are emitted as they are found.
//
// An upper written with redirect_dir on is refused (ErrOverlayFeature): a
// renamed directory's content would be missing from the list. An error of
// emit ends the walk and is returned.
func Changes(ctx context.Context, upper string, lowers []string, emit func(Change) error) (ChangeStats, error) {
	fd, err := unix.Open(upper, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return ChangeStats{}, fmt.Errorf("open upper directory: %w", &os.PathError{Op: "open", Path: upper, Err: err})
	}
	defer unix.Close(fd)
	w := &changeWalk{ctx: ctx, emit: emit, links: map[fileID]bool{}}
	all := make([]int, len(lowers))
	for i := range lowers {
		// Top first, as overlayfs looks them up.
		w.lowers = append(w.lowers, lowers[len(lowers)-1-i])
		all[i] = i
		if fi, err := os.Stat(w.lowers[i]); err != nil {
			return ChangeStats{}, fmt.Errorf("layer directory: %w", err)
		} else if !fi.IsDir() {
			return ChangeStats{}, fmt.Errorf("layer directory %s is not a directory", w.lowers[i])
		}
	}
	_, root, err := w.lookup(all, "")
	if err != nil {
		return ChangeStats{}, err
	}
	opaque, err := DirOpaque(fd)
	if err != nil {
		return ChangeStats{}, fmt.Errorf("read %s of the upper directory %s: %w", xattrOpaque, upper, err)
	}
	err = w.dir(fd, "", root, opaque)
	return w.stats, err
}

type changeWalk struct {
	ctx  context.Context
	emit func(Change) error
	// lowers are the layer directories, top first.
	lowers []string
	stats  ChangeStats
	// links holds the regular files of more than one name already counted
	// in stats.Bytes.
	links map[fileID]bool
}

// item is what the walk of a directory emits: the change of one of its
// entries (key: the entry's name), or the changes below one of its
// subdirectories (key: the name and "/"). As names hold no "/", items in
// the order of their keys are in the order of the full paths they stand
// for: "a", "a-b", "a.txt", then "a/..." ("-" and "." sort before "/").
type item struct {
	key    string
	change Change
	// For the items of a subdirectory: its lowers' directory and whether
	// the lowers are hidden under it (see dir).
	sub    bool
	below  []int
	hidden bool
}

// lookup finds p in the lowers' merged tree, looking in the layers stack
// (indexes into lowers, top first) that make up p's parent directory. It
// returns the stat of p in the top-most layer that has it (nil if none
// does, or a whiteout deletes it first) and, if p is a directory, the
// layers that make it up: each that has p as a directory, down to the
// first where it is opaque, or where a whiteout or a non-directory hides
// the rest.
func (w *changeWalk) lookup(stack []int, p string) (*unix.Stat_t, []int, error) {
	var found *unix.Stat_t
	var below []int
	for _, i := range stack {
		lp := filepath.Join(w.lowers[i], p)
		var st unix.Stat_t
		err := unix.Lstat(lp, &st)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("stat %s in the layer cache: %w", lp, err)
		}
		if IsWhiteout(&st) {
			break
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if found == nil {
				found = &st
			}
			break
		}
		if found == nil {
			found = &st
		}
		below = append(below, i)
		opaque, err := xattrIs(func(b []byte) (int, error) { return unix.Lgetxattr(lp, xattrOpaque, b) }, "y")
		if err != nil {
			return nil, nil, fmt.Errorf("read %s of %s in the layer cache: %w", xattrOpaque, lp, err)
		}
		if opaque {
			break
		}
	}
	return found, below, nil
}

// dir emits the changes under the upper directory fd, whose path is rel
// ("" for the root). stack is the lowers' directory at rel (nil when they
// have none); hidden says that the lowers no longer show through it (it or
// a parent is opaque in the upper), so that what they have and the upper
// lacks is deleted.
func (w *changeWalk) dir(fd int, rel string, stack []int, hidden bool) error {
	// A duplicate, so that closing the os.File leaves fd open.
	dup, err := unix.Dup(fd)
	if err != nil {
		return fmt.Errorf("read directory %q of the upper: %w", rel, err)
	}
	f := os.NewFile(uintptr(dup), rel)
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("read directory %q of the upper: %w", rel, err)
	}
	var kept map[string]bool // the names the upper has, when hidden
	if hidden && len(stack) > 0 {
		kept = map[string]bool{}
	}
	items := make([]item, 0, len(names))
	for _, n := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		if items, err = w.entry(items, fd, rel, n, stack, hidden, kept); err != nil {
			return err
		}
	}
	if kept != nil {
		if items, err = w.hiddenBelow(items, rel, stack, kept); err != nil {
			return err
		}
	}
	slices.SortFunc(items, func(a, b item) int { return strings.Compare(a.key, b.key) })
	for _, it := range items {
		if it.sub {
			err = w.subdir(fd, rel, strings.TrimSuffix(it.key, "/"), it.below, it.hidden)
		} else {
			err = w.add(it.change)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// entry appends the items of name in the upper directory pfd to items.
func (w *changeWalk) entry(items []item, pfd int, rel, name string, stack []int, hidden bool, kept map[string]bool) ([]item, error) {
	p := path.Join(rel, name)
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return items, nil // removed since the directory was read
		}
		return items, fmt.Errorf("stat %q in the upper: %w", p, err)
	}
	before, below, err := w.lookup(stack, p)
	if err != nil {
		return items, err
	}
	if IsWhiteout(&st) {
		// In a hidden directory, hiddenBelow lists what the lowers lose.
		if before != nil && !hidden {
			items = append(items, item{key: name, change: Change{Path: "/" + p, Kind: Deleted, Type: fileType(before)}})
		}
		return items, nil
	}
	if kept != nil {
		kept[name] = true
	}
	c := Change{Path: "/" + p, Kind: Added, Type: fileType(&st)}
	if before != nil {
		c.Kind = Changed
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		c.Size = st.Size
		id := fileID{dev: uint64(st.Dev), ino: st.Ino}
		if st.Nlink <= 1 || !w.links[id] {
			w.stats.Bytes += st.Size
		}
		if st.Nlink > 1 {
			w.links[id] = true
		}
	case unix.S_IFLNK:
		c.Size = st.Size
	}
	items = append(items, item{key: name, change: c})
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		items = append(items, item{key: name + "/", sub: true, below: below, hidden: hidden})
	}
	return items, nil
}

// subdir emits the changes under the directory name of the upper directory
// pfd.
func (w *changeWalk) subdir(pfd int, rel, name string, below []int, hidden bool) error {
	p := path.Join(rel, name)
	fd, err := openDir(pfd, name, p)
	if errors.Is(err, errNotSame) {
		return nil // replaced since the stat: the pod is writing
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	switch _, err := unix.Fgetxattr(fd, xattrRedirect, nil); {
	case err == nil:
		return fmt.Errorf("%w: %q has %s: the volume was mounted with redirect_dir on, and the content of a renamed directory is in a lower layer; "+
			"publish it again with this version of strata (which turns it off)", ErrOverlayFeature, p, xattrRedirect)
	case !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.ENOTSUP):
		return fmt.Errorf("read %s of %q in the upper: %w", xattrRedirect, p, err)
	}
	opaque, err := DirOpaque(fd)
	if err != nil {
		return fmt.Errorf("read %s of %q in the upper: %w", xattrOpaque, p, err)
	}
	return w.dir(fd, p, below, hidden || opaque)
}

// hiddenBelow appends to items the deletion of each entry of the lowers'
// directory rel (made of the layers stack) that the upper, which hides it,
// does not have: only the entry, not its content.
func (w *changeWalk) hiddenBelow(items []item, rel string, stack []int, kept map[string]bool) ([]item, error) {
	seen := map[string]bool{}
	for _, i := range stack {
		dir := filepath.Join(w.lowers[i], rel)
		f, err := os.Open(dir)
		if err != nil {
			return items, fmt.Errorf("read %s in the layer cache: %w", dir, err)
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return items, fmt.Errorf("read %s in the layer cache: %w", dir, err)
		}
		for _, n := range names {
			if seen[n] {
				continue // a higher layer has it, or deletes it
			}
			seen[n] = true
			if kept[n] {
				continue
			}
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(dir, n), &st); err != nil {
				return items, fmt.Errorf("stat %s in the layer cache: %w", filepath.Join(dir, n), err)
			}
			if !IsWhiteout(&st) {
				items = append(items, item{key: n, change: Change{Path: "/" + path.Join(rel, n), Kind: Deleted, Type: fileType(&st)}})
			}
		}
	}
	return items, nil
}

// add counts c and emits it.
func (w *changeWalk) add(c Change) error {
	switch c.Kind {
	case Added:
		w.stats.Added++
	case Changed:
		w.stats.Changed++
	case Deleted:
		w.stats.Deleted++
	}
	return w.emit(c)
}

// fileType names the type of st.
func fileType(st *unix.Stat_t) string {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "chardev"
	case unix.S_IFBLK:
		return "blockdev"
	}
	return "unknown"
}

// DirOpaque reports whether the directory fd is opaque
// (trusted.overlay.opaque=y): it hides the lower layers' entries.
func DirOpaque(fd int) (bool, error) {
	return xattrIs(func(b []byte) (int, error) { return unix.Fgetxattr(fd, xattrOpaque, b) }, "y")
}

// xattrIs reports whether the xattr that get reads into its buffer (with
// Fgetxattr or Lgetxattr) is value, with a buffer just large enough: the
// walk reads one per directory.
func xattrIs(get func([]byte) (int, error), value string) (bool, error) {
	buf := make([]byte, len(value)+1)
	n, err := get(buf)
	switch {
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ERANGE):
		return false, nil // not set, or longer than value
	case err != nil:
		return false, ignoreNoXattr(err)
	}
	return string(buf[:n]) == value, nil
}
