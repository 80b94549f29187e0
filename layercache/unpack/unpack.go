// Package unpack turns one uncompressed OCI image layer (a tar stream) into a
// directory that overlayfs can use as a lower dir.
//
// Whiteouts are written in overlayfs's classic form: `.wh.NAME` becomes a 0/0
// character device NAME, and `.wh..wh..opq` becomes the xattr
// `trusted.overlay.opaque=y` on its directory. No `.wh.*` name is ever left in
// the output.
//
// Path safety is the point of this package. Every name is cleaned, every parent
// directory is resolved by the kernel beneath the layer root with
// openat2(RESOLVE_BENEATH), and every object is created relative to that parent
// with a single-component name and no symlink following. A layer that tries to
// leave its directory, by name, by hardlink or by writing through a symlink,
// fails as a whole with an error that wraps ErrUnsafe.
//
// RESOLVE_BENEATH also refuses an absolute symlink as a parent, even one that
// would lead back inside the layer (`abs -> /d`, then `abs/file`): what an
// absolute target means depends on where the layer is mounted, so such a
// layer is unsafe. Image builders do not produce these (a layer's own entries
// are named by their real path), while symlinks themselves, absolute or not,
// are kept as data and never followed here.
package unpack

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/fault"
)

// ErrUnsafe is wrapped by every error caused by a hostile entry: a name, a
// hardlink target or a symlinked parent that leads out of the layer, or a
// whiteout name that escapes its directory.
var ErrUnsafe = fault.New(fault.Unsafe, "unsafe layer")

// UnsafeError names the hostile entry of a layer and what is wrong with it.
// errors.Is(err, ErrUnsafe) is true for it.
type UnsafeError struct {
	// Entry is the entry name as it appears in the tar.
	Entry string
	// Reason says what the entry tried, e.g. "path leaves the layer".
	Reason string
}

// Error returns a message like
// `unsafe layer: entry "../etc/passwd": path leaves the layer`.
func (e *UnsafeError) Error() string {
	return fmt.Sprintf("%v: entry %q: %s", ErrUnsafe, e.Entry, e.Reason)
}

// Unwrap returns ErrUnsafe.
func (e *UnsafeError) Unwrap() error { return ErrUnsafe }

// Stats counts what Apply did.
type Stats struct {
	Entries   int64 // tar entries processed
	Files     int64 // regular files created
	Bytes     int64 // logical bytes of regular file content written
	Whiteouts int64 // whiteouts (char 0/0) created
	Opaques   int64 // directories marked opaque
	Skipped   int64 // entries deliberately not created (device nodes, aufs metadata)

	// peakDirTimes is the most directory times held in memory at once, and
	// lookups the path components resolved from the layer root (tests
	// check the bounds).
	peakDirTimes int
	lookups      int64
}

const (
	// whiteoutPrefix marks a deleted NAME as `.wh.NAME` in OCI and Docker layers.
	whiteoutPrefix = ".wh."
	// whiteoutMetaPrefix marks aufs metadata (`.wh..wh.plnk`, `.wh..wh.aufs`),
	// which has no meaning for overlayfs.
	whiteoutMetaPrefix = whiteoutPrefix + whiteoutPrefix
	// whiteoutOpaque marks its directory opaque: it hides the lower layers'
	// contents of that directory.
	whiteoutOpaque = whiteoutMetaPrefix + ".opq"

	// copyBufSize is the size of the reused copy buffer. Large enough that a big
	// file takes few read/write round trips through archive/tar.
	copyBufSize = 1 << 20
	// sparseBlock is the granularity at which runs of zeros become holes. It is
	// the block size of every filesystem we run on; a smaller hole would be
	// allocated anyway.
	sparseBlock = 4096
	// dirTimesInMemory bounds the directory times held in memory; more go
	// to a spill file (dirtimes.go).
	dirTimesInMemory = 1 << 14
	// maxCachedDirs bounds the parent fd cache, so a layer with a huge number
	// of directories cannot exhaust the process's file descriptors.
	maxCachedDirs = 512
)

// Meter is told of what an unpack is about to write, before it writes it,
// and stops the unpack by returning an error, which Apply returns wrapped.
// What an entry costs is the meter's policy.
type Meter interface {
	// Entry is called before each tar entry is applied, whatever its type.
	Entry() error
	// Content is called with the size of each chunk of regular file
	// content before the chunk is read: a sparse file counts at its full
	// length. The calls for a complete unpack add up to Stats.Bytes.
	Content(n int64) error
}

// Option configures Apply.
type Option func(*applier)

// WithMeter makes Apply charge m for what it writes (see Meter).
func WithMeter(m Meter) Option {
	return func(a *applier) { a.meter = m }
}

// maxDirTimes is dirTimesInMemory; tests lower it.
var maxDirTimes = dirTimesInMemory

// Apply extracts the tar stream r into dir, which must exist and be empty.
// It never writes outside dir, whatever r contains. On error the caller removes dir.
// It does not fsync (the caller does one syncfs per layer).
//
// ctx is checked between entries; a cancelled ctx makes Apply return ctx.Err().
func Apply(ctx context.Context, dir string, r io.Reader, opts ...Option) (Stats, error) {
	if err := checkEmpty(dir); err != nil {
		return Stats{}, err
	}
	rootfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Stats{}, fmt.Errorf("open layer dir: %w", &os.PathError{Op: "open", Path: dir, Err: err})
	}
	a := &applier{
		log:      klog.FromContext(ctx),
		dir:      dir,
		rootfd:   rootfd,
		dirs:     make(map[string]int),
		dirTimes: make(map[string]dirTime),
		skipped:  make(map[string]bool),
		buf:      make([]byte, copyBufSize),
	}
	for _, o := range opts {
		o(a)
	}
	defer a.close()

	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return a.stats, err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return a.stats, fmt.Errorf("read layer tar after %d entries: %w", a.stats.Entries, err)
		}
		if a.meter != nil {
			if err := a.meter.Entry(); err != nil {
				return a.stats, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
		}
		a.stats.Entries++
		a.startEntry()
		if err := a.entry(hdr, tr); err != nil {
			return a.stats, err
		}
	}
	if err := a.applyDirTimes(); err != nil {
		return a.stats, err
	}
	return a.stats, nil
}

// checkEmpty makes sure dir is an existing, empty directory, so that nothing in
// it predates the layer (a pre-existing symlink could otherwise lead out).
func checkEmpty(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open layer dir: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return fmt.Errorf("read layer dir: %w", err)
	}
	if len(names) > 0 {
		return fmt.Errorf("layer dir %s is not empty (it holds %q): unpack into a new empty directory", dir, names[0])
	}
	return nil
}

// dirTime is a directory's timestamps, applied after all entries because
// creating children updates a directory's mtime.
type dirTime struct {
	ino          uint64 // to notice that a later entry replaced the directory
	atime, mtime unix.Timespec
}

// applier holds the state of one Apply.
type applier struct {
	log    klog.Logger
	dir    string // the layer root, as given by the caller (only for messages and the lsetxattr fallback)
	rootfd int
	stats  Stats

	// dirs caches O_PATH fds of parent directories by their cleaned path
	// relative to the root. It is cleared whenever an entry removes or
	// replaces anything, because a cached path could then resolve to
	// something else (a directory replaced by a symlink that leads out).
	dirs map[string]int
	// stale holds fds dropped from dirs during the current entry; the entry
	// may still be using them, so they are closed when the next one starts.
	stale []int

	// dirTimes holds directory times to set at the end, at most
	// maxDirTimes; spill (through spillW) holds the rest (dirtimes.go).
	dirTimes map[string]dirTime
	spill    *os.File
	spillW   *bufio.Writer
	// skipped records names that were deliberately not created, so that a
	// hardlink to one of them is skipped as well instead of failing the layer.
	skipped map[string]bool
	buf     []byte
	meter   Meter // nil: no accounting
}

func (a *applier) close() {
	a.closeSpill()
	a.startEntry()
	a.invalidate()
	a.startEntry()
	unix.Close(a.rootfd)
}

// startEntry closes fds dropped during the previous entry and keeps the cache
// bounded. It runs only between entries, so no fd in use is closed.
func (a *applier) startEntry() {
	for _, fd := range a.stale {
		unix.Close(fd)
	}
	a.stale = a.stale[:0]
	if len(a.dirs) >= maxCachedDirs {
		a.invalidate()
		for _, fd := range a.stale {
			unix.Close(fd)
		}
		a.stale = a.stale[:0]
	}
}

// invalidate forgets every cached parent fd.
func (a *applier) invalidate() {
	if len(a.dirs) == 0 {
		return
	}
	for _, fd := range a.dirs {
		a.stale = append(a.stale, fd)
	}
	clear(a.dirs)
}

// cleanName turns a tar name into a path relative to the root: a leading "/"
// is stripped as tar does, and "." stands for the root itself. ok is false for
// a name that leaves the layer.
func cleanName(name string) (clean string, ok bool) {
	clean = path.Clean(strings.TrimLeft(name, "/"))
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", false
	}
	return clean, true
}

func (a *applier) entry(hdr *tar.Header, tr *tar.Reader) error {
	name, ok := cleanName(hdr.Name)
	if !ok {
		return &UnsafeError{Entry: hdr.Name, Reason: "path leaves the layer"}
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		// PAX global headers carry defaults archive/tar has already applied.
		return nil
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("entry %q: the layer root can only be a directory, not type %q", hdr.Name, hdr.Typeflag)
		}
		return a.rootDir(hdr)
	}
	parent, base := path.Split(name)
	parent = path.Clean(parent) // "." for the root, no trailing slash otherwise

	// A whiteout name can never be a parent: overlayfs would not understand
	// it, and `.wh.../x` would make `..` the thing whited out.
	for _, comp := range strings.Split(parent, "/") {
		if strings.HasPrefix(comp, whiteoutMetaPrefix) {
			return a.skip(hdr, name, "aufs metadata")
		}
		if strings.HasPrefix(comp, whiteoutPrefix) {
			return &UnsafeError{Entry: hdr.Name, Reason: "whiteout name escapes its directory"}
		}
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		return a.whiteoutEntry(hdr, name, parent, base)
	}

	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeCont, tar.TypeGNUSparse:
		return a.regular(hdr, tr, name, parent, base)
	case tar.TypeDir:
		return a.directory(hdr, name, parent, base)
	case tar.TypeSymlink:
		return a.symlink(hdr, name, parent, base)
	case tar.TypeLink:
		return a.hardlink(hdr, name, parent, base)
	case tar.TypeFifo:
		return a.fifo(hdr, name, parent, base)
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Typeflag == tar.TypeChar && hdr.Devmajor == 0 && hdr.Devminor == 0 {
			// Already in overlayfs form, as in a layer exported from overlayfs.
			pfd, err := a.parent(hdr.Name, parent, true)
			if err != nil {
				return err
			}
			return a.whiteout(hdr.Name, pfd, base)
		}
		a.log.V(2).Info("skipping device node", "entry", name, "type", string(hdr.Typeflag),
			"major", hdr.Devmajor, "minor", hdr.Devminor)
		return a.skip(hdr, name, "")
	default:
		return fmt.Errorf("entry %q: unsupported tar entry type %q: this is not an OCI image layer archive.tar can describe", hdr.Name, hdr.Typeflag)
	}
}

// skip counts an entry that is deliberately not created.
func (a *applier) skip(hdr *tar.Header, name, why string) error {
	if why != "" {
		a.log.V(2).Info("skipping entry", "entry", hdr.Name, "reason", why)
	}
	a.stats.Skipped++
	if len(a.skipped) < 1<<16 {
		a.skipped[name] = true
	}
	return nil
}

// whiteoutEntry handles a `.wh.`-prefixed base name, whatever the entry type.
func (a *applier) whiteoutEntry(hdr *tar.Header, name, parent, base string) error {
	if strings.HasPrefix(base, whiteoutMetaPrefix) {
		if base != whiteoutOpaque {
			return a.skip(hdr, name, "aufs metadata")
		}
		pfd, err := a.parent(hdr.Name, parent, true)
		if err != nil {
			return err
		}
		// The cached fd is O_PATH, on which fsetxattr fails with EBADF;
		// reopening "." through it gives a real fd for the same directory.
		fd, err := unix.Openat(pfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return entryErr(hdr.Name, "open directory to mark opaque", err)
		}
		defer unix.Close(fd)
		if err := unix.Fsetxattr(fd, "trusted.overlay.opaque", []byte("y"), 0); err != nil {
			return entryErr(hdr.Name, "set trusted.overlay.opaque (the layer filesystem must support trusted xattrs)", err)
		}
		a.stats.Opaques++
		return nil
	}
	target := strings.TrimPrefix(base, whiteoutPrefix)
	if target == "" || target == "." || target == ".." || strings.Contains(target, "/") {
		return &UnsafeError{Entry: hdr.Name, Reason: "whiteout name escapes its directory"}
	}
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	return a.whiteout(hdr.Name, pfd, target)
}

// whiteout creates the overlayfs whiteout for base in the directory pfd: a
// character device 0/0, replacing whatever is there.
func (a *applier) whiteout(entry string, pfd int, base string) error {
	err := a.create(entry, pfd, base, false, func() error {
		return unix.Mknodat(pfd, base, unix.S_IFCHR, 0)
	})
	if err != nil {
		return entryErr(entry, "create whiteout", err)
	}
	// Owned by root even in a setgid directory, as overlayfs creates them.
	if err := unix.Fchownat(pfd, base, 0, 0, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return entryErr(entry, "chown whiteout", err)
	}
	a.stats.Whiteouts++
	return nil
}

// create runs mk, which creates base in pfd and fails with EEXIST if the name
// is taken. On EEXIST it removes the old object (recursively if it is a
// directory) and runs mk again: a later entry replaces an earlier one. With
// keepDir, an existing directory is kept as it is (a directory entry over a
// directory merges into it).
func (a *applier) create(entry string, pfd int, base string, keepDir bool, mk func() error) error {
	err := mk()
	if err != unix.EEXIST {
		return err
	}
	if keepDir {
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return nil
		}
	}
	if err := a.remove(pfd, base); err != nil {
		return fmt.Errorf("replace existing %q: %w", base, err)
	}
	return mk()
}

// remove deletes base from pfd, recursively if it is a directory.
func (a *applier) remove(pfd int, base string) error {
	// Anything cached may have gone through what is removed now.
	a.invalidate()
	return removeAllAt(pfd, base)
}

// rootDir applies a "." directory entry's metadata to the layer root.
func (a *applier) rootDir(hdr *tar.Header) error {
	return a.dirMeta(hdr, a.rootfd, ".")
}

func (a *applier) directory(hdr *tar.Header, name, parent, base string) error {
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	err = a.create(hdr.Name, pfd, base, true, func() error {
		return unix.Mkdirat(pfd, base, 0o700)
	})
	if err != nil {
		return entryErr(hdr.Name, "create directory", err)
	}
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return entryErr(hdr.Name, "open directory", err)
	}
	defer unix.Close(fd)
	return a.dirMeta(hdr, fd, name)
}

// dirMeta sets owner, mode and xattrs of the directory fd now, and records its
// times for the end.
func (a *applier) dirMeta(hdr *tar.Header, fd int, name string) error {
	if err := a.fdMeta(hdr, fd); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return entryErr(hdr.Name, "stat directory", err)
	}
	atime, mtime := times(hdr)
	if err := a.recordDirTime(name, dirTime{ino: st.Ino, atime: atime, mtime: mtime}); err != nil {
		return entryErr(hdr.Name, "record directory times", err)
	}
	return nil
}

// fdMeta applies owner, mode and xattrs through an open (non-O_PATH) fd.
func (a *applier) fdMeta(hdr *tar.Header, fd int) error {
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return entryErr(hdr.Name, "chown", err)
	}
	// After chown: chown clears the setuid and setgid bits.
	if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
		return entryErr(hdr.Name, "chmod", err)
	}
	return a.setXattrs(hdr, fd)
}

// setXattrs sets the entry's xattrs on fd.
func (a *applier) setXattrs(hdr *tar.Header, fd int) error {
	for key, value := range a.xattrs(hdr, false) {
		if err := unix.Fsetxattr(fd, key, []byte(value), 0); err != nil {
			return entryErr(hdr.Name, "set xattr "+key, err)
		}
	}
	return nil
}

// ownedAsWanted reports whether the new file fd already has the entry's
// owner and mode, so that fchown and fchmod can be skipped. Only a root-owned
// entry without special bits qualifies; the fstat catches a umask that
// masked permission bits and a setgid parent directory that gave the file
// its group.
func (a *applier) ownedAsWanted(fd int, hdr *tar.Header, mode uint32) bool {
	if hdr.Uid != 0 || hdr.Gid != 0 || mode&0o7000 != 0 {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false
	}
	return st.Uid == 0 && st.Gid == 0 && st.Mode&0o7777 == mode
}

// xattrs yields the entry's xattrs that may be set (KeepXattr): an image could
// otherwise forge overlayfs redirects, metacopy or opaque markers, or security
// labels the node trusts.
func (a *applier) xattrs(hdr *tar.Header, special bool) func(yield func(string, string) bool) {
	return func(yield func(string, string) bool) {
		for k, v := range hdr.PAXRecords {
			key, ok := strings.CutPrefix(k, "SCHILY.xattr.")
			if !ok {
				continue
			}
			if !KeepXattr(key) {
				a.log.V(2).Info("dropping xattr from layer", "entry", hdr.Name, "xattr", key)
				continue
			}
			if special && strings.HasPrefix(key, "user.") {
				// Linux refuses user.* xattrs on anything but regular
				// files and directories (EPERM): symlinks, FIFOs.
				a.log.V(2).Info("dropping user xattr of a symlink or FIFO", "entry", hdr.Name, "xattr", key)
				continue
			}
			if !yield(key, v) {
				return
			}
		}
	}
}

func (a *applier) regular(hdr *tar.Header, tr *tar.Reader, name, parent, base string) error {
	if hdr.Size < 0 {
		return fmt.Errorf("entry %q: negative size %d", hdr.Name, hdr.Size)
	}
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	// Create the file with its final permission bits (the special bits come
	// with fchmod, after any chown), so that the common root-owned file
	// needs neither fchown nor fchmod: each is a journalled inode update,
	// and a layer has tens of thousands of files.
	mode := uint32(hdr.Mode & 0o7777)
	var fd int
	err = a.create(hdr.Name, pfd, base, false, func() error {
		var err error
		fd, err = unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode&0o777)
		return err
	})
	if err != nil {
		return entryErr(hdr.Name, "create file", err)
	}
	defer unix.Close(fd)
	a.stats.Files++
	if err := a.copySparse(fd, tr, hdr.Size); err != nil {
		return fmt.Errorf("entry %q: write file content: %w", hdr.Name, err)
	}
	a.stats.Bytes += hdr.Size
	if a.ownedAsWanted(fd, hdr, mode) {
		if err := a.setXattrs(hdr, fd); err != nil {
			return err
		}
	} else if err := a.fdMeta(hdr, fd); err != nil {
		return err
	}
	atime, mtime := times(hdr)
	// AT_EMPTY_PATH: set the times of fd itself. x/sys's Futimes goes through
	// /proc/self/fd, which we do not rely on.
	if err := unix.UtimesNanoAt(fd, "", []unix.Timespec{atime, mtime}, unix.AT_EMPTY_PATH); err != nil {
		return entryErr(hdr.Name, "set times", err)
	}
	return nil
}

// copySparse writes size bytes from r into the new, empty file fd. Aligned
// 4 KiB blocks of zeros are skipped, which leaves holes: archive/tar expands a
// sparse file's holes into zeros on Read, and writing them would allocate
// every block of, say, a mostly empty disk image. The final ftruncate gives the
// file its size when it ends in a hole.
func (a *applier) copySparse(fd int, r io.Reader, size int64) error {
	var off int64
	end := int64(0) // offset after the last byte actually written
	for off < size {
		chunk := a.buf
		if rem := size - off; rem < int64(len(chunk)) {
			chunk = chunk[:rem]
		}
		if a.meter != nil {
			if err := a.meter.Content(int64(len(chunk))); err != nil {
				return err
			}
		}
		n, err := io.ReadFull(r, chunk)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		chunk = chunk[:n]
		// Write each maximal run of blocks that are not all zero.
		for i := 0; i < len(chunk); {
			j := min(i+sparseBlock, len(chunk))
			if isZero(chunk[i:j]) {
				i = j
				continue
			}
			for j < len(chunk) {
				k := min(j+sparseBlock, len(chunk))
				if isZero(chunk[j:k]) {
					break
				}
				j = k
			}
			if err := pwriteAll(fd, chunk[i:j], off+int64(i)); err != nil {
				return err
			}
			end = off + int64(j)
			i = j
		}
		off += int64(n)
	}
	if end < size {
		if err := unix.Ftruncate(fd, size); err != nil {
			return fmt.Errorf("ftruncate: %w", err)
		}
	}
	return nil
}

var zeroBlock [sparseBlock]byte

func isZero(b []byte) bool {
	// string comparison compiles to the runtime's vectorised memequal.
	return string(b) == string(zeroBlock[:len(b)])
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		b = b[n:]
		off += int64(n)
	}
	return nil
}

func (a *applier) symlink(hdr *tar.Header, name, parent, base string) error {
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	// The target is only data: it is never followed while unpacking, since
	// every parent is resolved with RESOLVE_BENEATH and every final component
	// with NOFOLLOW, and overlayfs resolves it in the mounting pod's view.
	err = a.create(hdr.Name, pfd, base, false, func() error {
		return unix.Symlinkat(hdr.Linkname, pfd, base)
	})
	if err != nil {
		return entryErr(hdr.Name, "create symlink", err)
	}
	return a.nameMeta(hdr, pfd, name, base, false)
}

func (a *applier) fifo(hdr *tar.Header, name, parent, base string) error {
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	err = a.create(hdr.Name, pfd, base, false, func() error {
		return unix.Mknodat(pfd, base, unix.S_IFIFO|0o600, 0)
	})
	if err != nil {
		return entryErr(hdr.Name, "create fifo", err)
	}
	return a.nameMeta(hdr, pfd, name, base, true)
}

// nameMeta applies metadata to base in pfd without opening it (opening a FIFO
// would block, a symlink cannot be opened for writing).
func (a *applier) nameMeta(hdr *tar.Header, pfd int, name, base string, chmod bool) error {
	if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return entryErr(hdr.Name, "chown", err)
	}
	if chmod {
		mode := uint32(hdr.Mode & 0o7777)
		err := unix.Fchmodat(pfd, base, mode, unix.AT_SYMLINK_NOFOLLOW)
		if err == unix.EOPNOTSUPP {
			// No fchmodat2 (Linux < 6.6): plain fchmodat cannot refuse to
			// follow a symlink, but base is the FIFO this entry just
			// created, and nothing else writes into the layer meanwhile.
			err = unix.Fchmodat(pfd, base, mode, 0)
		}
		if err != nil {
			return entryErr(hdr.Name, "chmod", err)
		}
	}
	for key, value := range a.xattrs(hdr, true) {
		if err := a.setxattrAt(pfd, name, base, key, value); err != nil {
			return entryErr(hdr.Name, "set xattr "+key, err)
		}
	}
	atime, mtime := times(hdr)
	if err := unix.UtimesNanoAt(pfd, base, []unix.Timespec{atime, mtime}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return entryErr(hdr.Name, "set times", err)
	}
	return nil
}

func (a *applier) hardlink(hdr *tar.Header, name, parent, base string) error {
	target, ok := cleanName(hdr.Linkname)
	if !ok {
		return &UnsafeError{Entry: hdr.Name, Reason: fmt.Sprintf("hardlink target %q leaves the layer", hdr.Linkname)}
	}
	if target == "." {
		return fmt.Errorf("entry %q: hardlink to the layer root", hdr.Name)
	}
	if target == name {
		// A link to itself: the name already is what it should be.
		return nil
	}
	if a.skipped[target] {
		return a.skip(hdr, name, "hardlink to a skipped entry")
	}
	tparent, tbase := path.Split(target)
	tparent = path.Clean(tparent)
	for _, comp := range strings.Split(target, "/") {
		if strings.HasPrefix(comp, whiteoutMetaPrefix) {
			// A link into aufs's `.wh..wh.plnk`, which was skipped.
			return a.skip(hdr, name, "hardlink into aufs metadata")
		}
	}
	tfd, err := a.parentFor(hdr.Name, tparent, false, "hardlink target reached through a symlink that leads out of the layer")
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("entry %q: hardlink target %q does not exist", hdr.Name, hdr.Linkname)
		}
		return err
	}
	pfd, err := a.parent(hdr.Name, parent, true)
	if err != nil {
		return err
	}
	// Flags 0: if the target is a symlink, link the symlink itself; never
	// follow it (it could lead out of the layer).
	err = a.create(hdr.Name, pfd, base, false, func() error {
		return unix.Linkat(tfd, tbase, pfd, base, 0)
	})
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("entry %q: hardlink target %q does not exist", hdr.Name, hdr.Linkname)
	}
	if err != nil {
		return entryErr(hdr.Name, "create hardlink", err)
	}
	return nil
}

// times returns an entry's atime and mtime; a missing atime is the mtime.
func times(hdr *tar.Header) (atime, mtime unix.Timespec) {
	mtime = unix.Timespec{Sec: hdr.ModTime.Unix(), Nsec: int64(hdr.ModTime.Nanosecond())}
	atime = mtime
	if !hdr.AccessTime.IsZero() {
		atime = unix.Timespec{Sec: hdr.AccessTime.Unix(), Nsec: int64(hdr.AccessTime.Nanosecond())}
	}
	return atime, mtime
}

// entryErr wraps a syscall error with the entry it happened to.
func entryErr(entry, op string, err error) error {
	return fmt.Errorf("entry %q: %s: %w", entry, op, err)
}
