package layercache

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
)

// readJSON decodes the JSON file at path into v. A file that is empty or
// does not decode, as a power failure can leave a state file written without
// fsync (see Store.writeAtomic), is reported as absent (fs.ErrNotExist) and
// logged.
func readJSON(path string, v any) error {
	found, err := atomicfile.ReadJSON(path, v)
	switch {
	case found && err != nil:
		klog.ErrorS(err, "Ignoring a torn state file (left by a power failure?)", "path", path)
		return fmt.Errorf("%w: %w", err, fs.ErrNotExist)
	case err != nil:
		return err
	case !found:
		return &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
	}
	return nil
}

// syncFS flushes the whole filesystem holding path: one syncfs(2) per
// unpacked layer is far cheaper than an fsync per file, and makes every file
// of the layer durable before it is renamed into place.
func syncFS(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return &os.PathError{Op: "syncfs", Path: path, Err: err}
	}
	return nil
}

// fileLock is an flock(2) on a file, shared between processes that use the
// same store root (the CSI plugin and the strata CLI).
type fileLock struct {
	f  *os.File
	mu *sync.Mutex // unlocked after the flock is released, if set
}

// lockPath takes an exclusive (or shared) flock on path, creating it if it
// is not there. path may also be an existing directory.
func lockPath(path string, exclusive bool) (*fileLock, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if errors.Is(err, unix.EISDIR) {
		f, err = os.Open(path)
	}
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, &os.PathError{Op: "flock", Path: path, Err: err}
	}
	return &fileLock{f: f}, nil
}

// unlock releases the lock.
func (l *fileLock) unlock() {
	_ = l.f.Close()
	if l.mu != nil {
		l.mu.Unlock()
	}
}
