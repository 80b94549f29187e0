package commit

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/layercache/unpack"
)

// ErrChanged is wrapped when a file changed while it was read: the volume is
// being written to. The commit is not consistent; quiesce the pod and retry.
var ErrChanged = errors.New("file changed while it was committed")

// ErrOverlayFeature is wrapped when the upper directory holds overlayfs
// redirects or metacopy files, which cannot be turned into a layer without
// the lower layers.
var ErrOverlayFeature = errors.New("upper directory uses an overlayfs feature a commit cannot represent")

// ErrUnrepresentable is wrapped when a name in the upper directory cannot be
// written to an OCI layer: a ".wh." name would mean a deletion there.
var ErrUnrepresentable = errors.New("name cannot be represented in an OCI layer")

const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = whiteoutPrefix + whiteoutPrefix + ".opq"

	xattrOpaque   = "trusted.overlay.opaque"
	xattrRedirect = "trusted.overlay.redirect"
	xattrMetacopy = "trusted.overlay.metacopy"
	// dirNamesInMemory bounds the names of one directory held in memory: a
	// directory with at most this many entries is written in sorted order,
	// a larger one in batches (see dir).
	dirNamesInMemory = 1 << 16
	// maxXattrSize is the kernel's limit on one xattr value (XATTR_SIZE_MAX).
	maxXattrSize = 64 << 10
)

// Stats counts what WriteTar wrote.
type Stats struct {
	Files     int64 // regular files with content
	Bytes     int64 // their content bytes
	Dirs      int64
	Symlinks  int64
	Hardlinks int64 // hardlink entries (names after the first of an inode)
	Whiteouts int64 // deletions (.wh.NAME)
	Opaques   int64 // directories that hide the layers below (.wh..wh..opq)
	Skipped   int64 // device nodes and sockets, which a layer does not carry

	// peakNames is the most directory entry names held in memory at once
	// (tests check the bound).
	peakNames int
}

// Entries is the number of tar entries written.
func (s Stats) Entries() int64 {
	return s.Files + s.Dirs + s.Symlinks + s.Hardlinks + s.Whiteouts + s.Opaques
}

// WriteTar writes the changes recorded in the overlayfs upper directory
// upper as an uncompressed OCI layer tar to w (see the package comment for
// the mapping). Names are visited in sorted order, so the same upper gives
// the same bytes (a directory of more than 65536 entries is visited in the
// filesystem's directory order, in batches: memory stays bounded).
//
// The upper may be in use: WriteTar opens everything relative to directory
// fds without following symlinks, so a concurrent rename cannot make it read
// outside upper, and it checks each regular file's size, mtime and ctime
// before and after reading it, failing with ErrChanged if they moved.
// Changes to files already written, or to directories, during the walk are
// not noticed: a consistent commit needs a quiet volume.
func WriteTar(ctx context.Context, upper string, w io.Writer) (Stats, error) {
	fd, err := unix.Open(upper, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return Stats{}, fmt.Errorf("open upper directory: %w", &os.PathError{Op: "open", Path: upper, Err: err})
	}
	d := &differ{
		ctx:   ctx,
		log:   klog.FromContext(ctx),
		upper: upper,
		tw:    tar.NewWriter(w),
		links: map[fileID]string{},
		buf:   make([]byte, 1<<20),
	}
	err = d.dir(fd, "")
	unix.Close(fd)
	if err != nil {
		return d.stats, err
	}
	if err := d.tw.Close(); err != nil {
		return d.stats, fmt.Errorf("finish layer tar: %w", err)
	}
	return d.stats, nil
}

// afterStat, when set (by tests only), runs between the walk's stat of an
// entry and what it does with it: the window in which a pod can swap one
// file for another.
var afterStat func(pfd int, name string)

// maxDirNames is dirNamesInMemory; tests lower it.
var maxDirNames = dirNamesInMemory

// fileID identifies an inode, to find the names of one file.
type fileID struct{ dev, ino uint64 }

type differ struct {
	ctx   context.Context
	log   klog.Logger
	upper string
	tw    *tar.Writer
	stats Stats
	// links maps an inode with more than one name to the first name
	// written, which later names link to.
	links map[fileID]string
	buf   []byte
	// heldNames counts the names listed by the directories being walked.
	heldNames int
}

// dir writes the entries of the directory fd, whose layer path is rel ("" for
// the root), recursively. A directory of at most maxDirNames entries is
// written in sorted order. A larger one, which a pod can make as large as
// its inodes allow, is read and written in batches of maxDirNames names in
// the filesystem's directory order (stable for an unchanged directory), so
// that memory does not grow with it.
func (d *differ) dir(fd int, rel string) error {
	// A duplicate, so that closing the os.File leaves the caller's fd open.
	dup, err := unix.Dup(fd)
	if err != nil {
		return fmt.Errorf("read directory %q of the upper: %w", rel, err)
	}
	f := os.NewFile(uintptr(dup), rel)
	defer f.Close()
	names, err := f.Readdirnames(maxDirNames + 1)
	if err != nil && err != io.EOF {
		return fmt.Errorf("read directory %q of the upper: %w", rel, err)
	}
	if len(names) <= maxDirNames {
		slices.Sort(names)
		return d.entries(fd, rel, names)
	}
	d.log.V(2).Info("Large directory: writing it in directory order, in batches", "path", rel, "batch", maxDirNames)
	for len(names) > 0 {
		if err := d.entries(fd, rel, names); err != nil {
			return err
		}
		names, err = f.Readdirnames(maxDirNames)
		if err != nil && err != io.EOF {
			return fmt.Errorf("read directory %q of the upper: %w", rel, err)
		}
	}
	return nil
}

// entries writes the entries names of the directory fd.
func (d *differ) entries(fd int, rel string, names []string) error {
	d.heldNames += len(names)
	defer func() { d.heldNames -= len(names) }()
	d.stats.peakNames = max(d.stats.peakNames, d.heldNames)
	for _, n := range names {
		if err := d.ctx.Err(); err != nil {
			return err
		}
		if err := d.entry(fd, rel, n); err != nil {
			return err
		}
	}
	return nil
}

// entry writes the tar entry (or entries) of name in the directory pfd.
func (d *differ) entry(pfd int, rel, name string) error {
	p := path.Join(rel, name)
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: %q was removed during the commit", ErrChanged, p)
		}
		return fmt.Errorf("stat %q in the upper: %w", p, err)
	}
	if afterStat != nil {
		afterStat(pfd, name)
	}
	mode := st.Mode & unix.S_IFMT
	if IsWhiteout(&st) {
		// Overlayfs shares one whiteout inode among many names (Linux
		// 5.8+), so this test comes before the hardlink one.
		return d.whiteout(p)
	}
	if strings.HasPrefix(name, whiteoutPrefix) {
		return fmt.Errorf("%w: %q: a layer would read it as a deletion; rename it", ErrUnrepresentable, p)
	}
	hdr := header(p, &st)
	if mode != unix.S_IFDIR && st.Nlink > 1 {
		id := fileID{dev: uint64(st.Dev), ino: st.Ino}
		if first, ok := d.links[id]; ok {
			hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			hdr.PAXRecords = nil
			d.stats.Hardlinks++
			return d.write(hdr)
		}
		d.links[id] = p
	}
	switch mode {
	case unix.S_IFREG:
		return d.regular(pfd, name, hdr, &st)
	case unix.S_IFDIR:
		return d.directory(pfd, name, hdr)
	case unix.S_IFLNK:
		return d.symlink(pfd, name, hdr)
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
		return d.write(hdr)
	}
	d.log.V(2).Info("Skipping a device node or socket: a layer does not carry it", "path", p, "mode", fmt.Sprintf("%#o", st.Mode))
	d.stats.Skipped++
	return nil
}

// IsWhiteout reports whether st is an overlayfs whiteout (a character
// device 0:0), as the cache's layers and a volume's upper store a deletion.
func IsWhiteout(st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 }

// header is the tar header of p with the metadata of st.
func header(p string, st *unix.Stat_t) *tar.Header {
	return &tar.Header{
		Name:    p,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		Format:  tar.FormatPAX,
	}
}

func (d *differ) write(hdr *tar.Header) error {
	if err := d.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write layer entry %q: %w", hdr.Name, err)
	}
	return nil
}

// whiteout writes the OCI deletion of p.
func (d *differ) whiteout(p string) error {
	dir, base := path.Split(p)
	d.stats.Whiteouts++
	return d.write(&tar.Header{Name: dir + whiteoutPrefix + base, Typeflag: tar.TypeReg,
		ModTime: time.Unix(0, 0), Format: tar.FormatPAX})
}

func (d *differ) regular(pfd int, name string, hdr *tar.Header, st *unix.Stat_t) error {
	fd, err := openRegular(pfd, name, st)
	if errors.Is(err, errNotSame) || errors.Is(err, unix.ENOENT) {
		return changed(hdr.Name)
	}
	if err != nil {
		return fmt.Errorf("open %q in the upper: %w", hdr.Name, err)
	}
	f := os.NewFile(uintptr(fd), hdr.Name)
	defer f.Close()
	before, err := fstat(fd)
	if err != nil {
		return fmt.Errorf("stat %q in the upper: %w", hdr.Name, err)
	}
	if before.Ino != st.Ino || before.Size != st.Size {
		return changed(hdr.Name)
	}
	if err := d.xattrs(fd, hdr); err != nil {
		return err
	}
	hdr.Typeflag, hdr.Size = tar.TypeReg, before.Size
	if err := d.write(hdr); err != nil {
		return err
	}
	n, err := io.CopyBuffer(d.tw, io.LimitReader(f, before.Size), d.buf)
	if err != nil {
		return fmt.Errorf("read %q in the upper: %w", hdr.Name, err)
	}
	after, err := fstat(fd)
	if err != nil {
		return fmt.Errorf("stat %q in the upper: %w", hdr.Name, err)
	}
	if n != before.Size || after.Size != before.Size || after.Mtim != before.Mtim || after.Ctim != before.Ctim {
		return changed(hdr.Name)
	}
	d.stats.Files++
	d.stats.Bytes += n
	return nil
}

// errNotSame says that name is no longer the regular file (or directory)
// the walk saw.
var errNotSame = errors.New("not the file the walk saw")

// openRegular opens name in pfd for reading, only if it still is the
// regular file st describes. The pod may swap in a FIFO, whose open(2)
// would block the commit forever, or a device node, whose open reaches a
// driver: so name is first opened with O_PATH (which opens nothing), its
// type and inode are checked, and only that inode is then opened for
// reading through /proc/self/fd (the magic link leads to the inode, not the
// name; O_NOFOLLOW would refuse the magic link itself), with O_NONBLOCK so
// that even a special file could not block.
func openRegular(pfd int, name string, st *unix.Stat_t) (int, error) {
	pathfd, err := unix.Openat(pfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pathfd)
	if err := sameRegular(pathfd, st); err != nil {
		return -1, err
	}
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pathfd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("reopen through /proc/self/fd (is /proc mounted?): %w", err)
	}
	if err := sameRegular(fd, st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// sameRegular checks that fd is the regular file st describes (device,
// inode and type).
func sameRegular(fd int, st *unix.Stat_t) error {
	got, err := fstat(fd)
	if err != nil {
		return err
	}
	if got.Mode&unix.S_IFMT != unix.S_IFREG || got.Dev != st.Dev || got.Ino != st.Ino {
		return errNotSame
	}
	return nil
}

func changed(p string) error {
	return fmt.Errorf("%w: %q: the volume is being written to; stop the writes (or the pod) and commit again", ErrChanged, p)
}

func fstat(fd int) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstat(fd, &st)
	return st, err
}

func (d *differ) directory(pfd int, name string, hdr *tar.Header) error {
	fd, err := openDir(pfd, name, hdr.Name)
	if errors.Is(err, errNotSame) {
		return changed(hdr.Name)
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	opaque, err := getxattr(fd, xattrOpaque)
	if err != nil {
		return fmt.Errorf("read %s of %q: %w", xattrOpaque, hdr.Name, err)
	}
	if err := d.xattrs(fd, hdr); err != nil {
		return err
	}
	rel := hdr.Name
	hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
	if err := d.write(hdr); err != nil {
		return err
	}
	d.stats.Dirs++
	if opaque == "y" {
		d.stats.Opaques++
		err := d.write(&tar.Header{Name: rel + "/" + whiteoutOpaque, Typeflag: tar.TypeReg,
			ModTime: time.Unix(0, 0), Format: tar.FormatPAX})
		if err != nil {
			return err
		}
	}
	return d.dir(fd, rel)
}

// openDir opens the directory name in pfd, whose path in the upper is p.
// O_DIRECTORY fails with ENOTDIR before anything is opened, so a FIFO or
// device node swapped in for the directory is never opened; a symlink is
// refused by O_NOFOLLOW (ELOOP). A name that is no longer a directory is
// errNotSame.
func openDir(pfd int, name, p string) (int, error) {
	fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOENT) {
		return -1, errNotSame
	}
	if err != nil {
		return -1, fmt.Errorf("open directory %q in the upper: %w", p, err)
	}
	return fd, nil
}

func (d *differ) symlink(pfd int, name string, hdr *tar.Header) error {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(pfd, name, buf)
	if err != nil {
		return fmt.Errorf("read symlink %q in the upper: %w", hdr.Name, err)
	}
	// Symlink xattrs are not kept: there is no fd-relative way to read
	// them before Linux 6.13, and Linux refuses user.* on symlinks anyway.
	hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, string(buf[:n])
	d.stats.Symlinks++
	return d.write(hdr)
}

// xattrs adds the xattrs of fd worth keeping to hdr as PAX records, and
// refuses the overlayfs markers that need the lower layers.
func (d *differ) xattrs(fd int, hdr *tar.Header) error {
	keys, err := listxattr(fd)
	if err != nil {
		return fmt.Errorf("list xattrs of %q: %w", hdr.Name, err)
	}
	for _, k := range keys {
		if k == xattrRedirect || k == xattrMetacopy {
			return fmt.Errorf("%w: %q has %s: the volume was mounted with redirect_dir or metacopy on; "+
				"publish it again with this version of strata (which turns both off) and redo its changes", ErrOverlayFeature, hdr.Name, k)
		}
		if !keepXattr(k) {
			continue
		}
		v, err := getxattr(fd, k)
		if err != nil {
			return fmt.Errorf("read xattr %s of %q: %w", k, hdr.Name, err)
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords["SCHILY.xattr."+k] = v
	}
	return nil
}

// keepXattr says whether an xattr belongs to the data (kept) or to the host
// or overlayfs (dropped). It is the unpacker's rule, so that a committed
// layer carries exactly what a pulled one may: opaque is written as
// .wh..wh..opq, redirect and metacopy are refused before this.
func keepXattr(k string) bool { return unpack.KeepXattr(k) }

// listxattr lists the xattr names of fd.
func listxattr(fd int) ([]string, error) {
	size, err := unix.Flistxattr(fd, nil)
	if err != nil || size == 0 {
		return nil, ignoreNoXattr(err)
	}
	buf := make([]byte, size)
	size, err = unix.Flistxattr(fd, buf)
	if err != nil {
		return nil, ignoreNoXattr(err)
	}
	var keys []string
	for _, k := range strings.Split(string(buf[:size]), "\x00") {
		if k != "" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys, nil
}

// getxattr reads one xattr of fd; "" if it is not set.
func getxattr(fd int, key string) (string, error) {
	buf := make([]byte, maxXattrSize)
	n, err := unix.Fgetxattr(fd, key, buf)
	if errors.Is(err, unix.ENODATA) {
		return "", nil
	}
	if err != nil {
		return "", ignoreNoXattr(err)
	}
	return string(buf[:n]), nil
}

// ignoreNoXattr treats a filesystem without xattr support as one without
// xattrs.
func ignoreNoXattr(err error) error {
	if errors.Is(err, unix.ENOTSUP) {
		return nil
	}
	return err
}
