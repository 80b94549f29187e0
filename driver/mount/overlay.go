package mount

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Overlay describes one overlay mount.
type Overlay struct {
	// Lowers are the lower directories, TOP FIRST (overlayfs order: the
	// first one wins over the ones after it). At most MaxLowers.
	Lowers []string
	// Upper is the writable upper directory; empty means no upper, that is a
	// read-only overlay of the lowers.
	Upper string
	// Work is overlayfs's work directory. Required with Upper, forbidden
	// without; it must be on the same mount as Upper.
	Work string
	// ReadOnly mounts the overlay read-only. It is implied when Upper is
	// empty.
	ReadOnly bool
	// Volatile skips every sync of the upper (overlayfs's "volatile"
	// option), including the one at unmount that otherwise costs a journal
	// commit. Only for an upper that is thrown away with the mount: after a
	// crash the kernel refuses to mount a volatile upper again until
	// work/work/incompat/volatile is removed.
	Volatile bool
	// Options are the volume's mount options (noexec, access times).
	Options Options
}

// overlayAPI is how overlay layers are handed to the kernel.
type overlayAPI int32

const (
	// apiFd: fsconfig(FSCONFIG_SET_FD, "lowerdir+") with an O_PATH fd per
	// layer (kernel 6.13+). No length limit of any kind.
	apiFd overlayAPI = iota + 1
	// apiString: fsconfig(FSCONFIG_SET_STRING, "lowerdir+") per layer (kernel
	// 6.8+). A string value is capped at 255 bytes by the kernel, so the
	// string passed is /proc/self/fd/N of an O_PATH fd, never the real path.
	apiString
	// apiClassic: one mount(2) call with a "lowerdir=a:b:c" option string
	// (kernels before 6.8). The kernel copies at most one page of options
	// and silently cuts the rest at 4095 bytes, so paths are /proc/self/fd/N
	// and an option string that would not fit is refused.
	apiClassic
)

func (a overlayAPI) String() string {
	switch a {
	case apiFd:
		return "fsconfig-fd"
	case apiString:
		return "fsconfig-string"
	case apiClassic:
		return "mount2"
	}
	return fmt.Sprintf("overlayAPI(%d)", int32(a))
}

// maxClassicData is the longest option string classic mount(2) passes on
// whole: the kernel copies one page (4096 bytes on every architecture we run
// on) and NUL-terminates it, so byte 4096 and beyond are silently dropped.
// Depending on where the cut falls the mount fails (ENOENT, ELOOP, EINVAL)
// or, worse, succeeds with the wrong bottom layer.
const maxClassicData = 4095

var (
	probeOnce sync.Once
	probedAPI overlayAPI
	forcedAPI atomic.Int32 // test hook: a non-zero overlayAPI overrides the probe
)

// currentAPI returns the overlay API to use, probing the kernel once.
func currentAPI() overlayAPI {
	if f := overlayAPI(forcedAPI.Load()); f != 0 {
		return f
	}
	probeOnce.Do(func() {
		probedAPI = probeAPI()
		klog.V(2).InfoS("Probed overlay mount API", "api", probedAPI.String())
	})
	return probedAPI
}

// probeAPI finds out whether the kernel accepts "lowerdir+" on an overlay fs
// context, as an fd or as a string. Nothing is created or mounted: setting a
// parameter only resolves the path.
func probeAPI() overlayAPI {
	rootfd, err := openDirPath("/")
	if err != nil {
		return apiClassic
	}
	defer unix.Close(rootfd)
	// A fresh fs context per attempt, so that a refused first try cannot
	// taint the second.
	try := func(set func(fsfd int) error) (ok bool, fsopenErr error) {
		fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
		if err != nil { // ENOSYS (before 5.2), or no overlay module
			return false, err
		}
		defer unix.Close(fsfd)
		return set(fsfd) == nil, nil
	}
	ok, err := try(func(fsfd int) error { return unix.FsconfigSetFd(fsfd, "lowerdir+", rootfd) })
	if err != nil {
		return apiClassic
	}
	if ok {
		return apiFd
	}
	if ok, _ := try(func(fsfd int) error { return unix.FsconfigSetString(fsfd, "lowerdir+", procFdPath(rootfd)) }); ok {
		return apiString
	}
	return apiClassic
}

// upperOptions pin the overlayfs features that decide what a writable
// upper directory can hold, whatever the kernel's defaults (module
// parameters and CONFIG_OVERLAY_FS_* differ between distributions). With
// them off, an upper is a self-contained diff that `strata commit`
// (package layercache/commit) turns into a layer:
//   - redirect_dir=nofollow: renaming a lower directory fails with EXDEV
//     (tools such as mv then copy it), instead of leaving a
//     trusted.overlay.redirect that points into the lower layers; and no
//     redirect is followed, as none is ever created.
//   - metacopy=off: a chmod or chown copies the whole file up, so the upper
//     never holds a metadata-only file whose data stays below.
//   - index=off: no upper file is linked from the work dir's index, and
//     hardlinks of lower files break on copy-up, as they do by default.
//
// xino is left alone: it changes only the inode numbers the merged view
// reports, never what the upper holds.
var upperOptions = []struct{ key, value string }{
	{"redirect_dir", "nofollow"},
	{"metacopy", "off"},
	{"index", "off"},
}

// validate checks o before anything reaches the kernel.
func (o *Overlay) validate() error {
	n := len(o.Lowers)
	if n == 0 {
		return errors.New("no lower layers")
	}
	if n > MaxLowers {
		return fmt.Errorf("%w: %d lower layers, overlayfs allows at most %d", ErrTooManyLayers, n, MaxLowers)
	}
	// Overlayfs refuses a directory given twice as a lower (ELOOP,
	// "conflicting lowerdir path" in the kernel log only): say which.
	seen := make(map[string]int, n)
	for i, l := range o.Lowers {
		if l == "" {
			return fmt.Errorf("lower %d of %d is an empty path", i+1, n)
		}
		if j, ok := seen[l]; ok {
			return fmt.Errorf("%w: lowers %d and %d of %d are the same directory %q; overlayfs takes a directory once: keep only the upper one",
				ErrRepeatedLower, j+1, i+1, n, l)
		}
		seen[l] = i
	}
	if o.Upper != "" && o.Work == "" {
		return fmt.Errorf("upper %q has no work directory", o.Upper)
	}
	if o.Upper == "" && o.Work != "" {
		return fmt.Errorf("work directory %q without an upper", o.Work)
	}
	return nil
}

// MountOverlay mounts o at target, an existing empty directory, always with
// nosuid and nodev (an image's setuid files and device nodes must not become
// a way out of a pod). An overlay with a single lower and no upper is mounted
// as a read-only bind of that lower, because overlayfs refuses it (EINVAL).
//
// A stack of more than MaxLowers lowers fails with ErrTooManyLayers before
// the kernel is called, as does, on kernels before 6.8, a stack whose mount
// options do not fit in one page. Kernel error messages, when there are any,
// are part of the returned error.
func MountOverlay(o Overlay, target string) error {
	if err := o.validate(); err != nil {
		return fmt.Errorf("overlay at %q: %w", target, err)
	}
	ro := o.ReadOnly || o.Upper == ""
	if len(o.Lowers) == 1 && o.Upper == "" {
		// overlayfs needs at least 2 lowers without an upper (EINVAL); a
		// read-only bind of the only layer shows exactly the same tree.
		if err := bind(o.Lowers[0], target, true, o.Options); err != nil {
			return fmt.Errorf("overlay of 1 layer (read-only bind) at %q: %w", target, err)
		}
		klog.V(4).InfoS("Mounted single-layer overlay as read-only bind", "targetPath", target, "layers", 1, "lower", o.Lowers[0])
		return nil
	}
	api := currentAPI()
	var err error
	if api == apiClassic {
		err = mountClassic(&o, target, ro)
	} else {
		err = mountFsopen(&o, target, ro, api)
	}
	if err != nil {
		return fmt.Errorf("overlay of %d layers at %q: %w", len(o.Lowers), target, err)
	}
	klog.V(4).InfoS("Mounted overlay", "targetPath", target, "layers", len(o.Lowers), "upper", o.Upper, "readOnly", ro, "options", o.Options.List(), "api", api.String())
	return nil
}

// mountFsopen mounts with fsopen/fsconfig/fsmount/move_mount.
func mountFsopen(o *Overlay, target string, ro bool, api overlayAPI) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)
	// Without a source, mountinfo shows "none"; "overlay" is what mount(8)
	// and container runtimes show, and what tools grep for.
	if err := unix.FsconfigSetString(fsfd, "source", "overlay"); err != nil {
		return withKernelMessages(fsfd, fmt.Errorf("fsconfig source: %w", err))
	}
	n := len(o.Lowers)
	for i, l := range o.Lowers {
		if err := fsconfigDir(fsfd, "lowerdir+", l, api); err != nil {
			return fmt.Errorf("lower %d of %d %q: %w", i+1, n, l, err)
		}
	}
	if o.Upper != "" {
		if err := fsconfigDir(fsfd, "upperdir", o.Upper, api); err != nil {
			return fmt.Errorf("upper %q: %w", o.Upper, err)
		}
		if err := fsconfigDir(fsfd, "workdir", o.Work, api); err != nil {
			return fmt.Errorf("work %q: %w", o.Work, err)
		}
		if o.Volatile {
			if err := unix.FsconfigSetFlag(fsfd, "volatile"); err != nil {
				return withKernelMessages(fsfd, fmt.Errorf("fsconfig volatile: %w", err))
			}
		}
		for _, opt := range upperOptions {
			if err := unix.FsconfigSetString(fsfd, opt.key, opt.value); err != nil {
				return withKernelMessages(fsfd, fmt.Errorf("fsconfig %s=%s: %w", opt.key, opt.value, err))
			}
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return withKernelMessages(fsfd, fmt.Errorf("fsconfig create: %w", err))
	}
	attr, _ := o.Options.attr(ro) // a new mount has no atime mode to clear
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, int(attr))
	if err != nil {
		return withKernelMessages(fsfd, fmt.Errorf("fsmount: %w", err))
	}
	// The mount fd pins the mount: it must be closed before anyone can
	// unmount it (EBUSY otherwise).
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount to %q: %w", target, err)
	}
	return nil
}

// fsconfigDir sets the directory parameter key of fsfd to path. The path is
// opened here as an O_PATH fd and handed over as that fd (apiFd) or as its
// /proc/self/fd/N name (apiString): fsconfig strings are capped at 255 bytes
// by the kernel, an fd has no limit. If the kernel refuses an fd for upperdir
// or workdir, the string form is tried.
func fsconfigDir(fsfd int, key, path string, api overlayAPI) error {
	fd, err := openDirPath(path)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if api == apiFd {
		err = unix.FsconfigSetFd(fsfd, key, fd)
		if err == nil {
			return nil
		}
		if key == "lowerdir+" || !errors.Is(err, unix.EINVAL) {
			return withKernelMessages(fsfd, fmt.Errorf("fsconfig %s: %w", key, err))
		}
		fsContextMessages(fsfd) // drop the "fd not accepted" message
	}
	if err := unix.FsconfigSetString(fsfd, key, procFdPath(fd)); err != nil {
		return withKernelMessages(fsfd, fmt.Errorf("fsconfig %s: %w", key, err))
	}
	return nil
}

// mountClassic mounts with a single mount(2) call, for kernels without
// "lowerdir+". Every directory is opened as an O_PATH fd and named by its
// short /proc/self/fd/N magic link, like Docker's overlay2 names its layers
// by short l/ links.
func mountClassic(o *Overlay, target string, ro bool) error {
	fds := make([]int, 0, len(o.Lowers)+2)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	open := func(what, path string) (string, error) {
		fd, err := openDirPath(path)
		if err != nil {
			return "", fmt.Errorf("%s %q: %w", what, path, err)
		}
		fds = append(fds, fd)
		return procFdPath(fd), nil
	}
	var b strings.Builder
	b.WriteString("lowerdir=")
	n := len(o.Lowers)
	for i, l := range o.Lowers {
		p, err := open(fmt.Sprintf("lower %d of %d", i+1, n), l)
		if err != nil {
			return err
		}
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteString(p)
	}
	if o.Upper != "" {
		p, err := open("upper", o.Upper)
		if err != nil {
			return err
		}
		b.WriteString(",upperdir=")
		b.WriteString(p)
		if p, err = open("work", o.Work); err != nil {
			return err
		}
		b.WriteString(",workdir=")
		b.WriteString(p)
		if o.Volatile {
			b.WriteString(",volatile")
		}
		for _, opt := range upperOptions {
			b.WriteString("," + opt.key + "=" + opt.value)
		}
	}
	data := b.String()
	if len(data) > maxClassicData {
		return fmt.Errorf("%w: mount(2) options for %d lower layers are %d bytes, the kernel keeps only %d (it has no lowerdir+ to pass layers one by one)",
			ErrTooManyLayers, n, len(data), maxClassicData)
	}
	if err := unix.Mount("overlay", target, "overlay", o.Options.flags(ro), data); err != nil {
		return fmt.Errorf("mount(2): %w", err)
	}
	return nil
}
