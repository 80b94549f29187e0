package layercache

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// writeFileAtomic replaces path with data so that a reader, or a process
// started after a crash of this one at any instant, sees either the old
// content or all of data: write a temporary file in stage (a directory on
// the same filesystem) and rename it over path.
//
// Nothing is fsynced: a process crash loses nothing that reached the page
// cache, and what a power failure loses or tears is a reference or record of
// a mount that the power failure took with it. readJSON treats a torn file
// as absent. (Layers, which are content, are made durable before they are
// committed: see fetchLayer.) An fsync here would double a publish's cost.
func writeFileAtomic(path string, data []byte, stage string) error {
	f, err := os.CreateTemp(stage, filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return nil
}

// readJSON decodes the JSON file at path into v. A file that is empty or
// does not decode, as a power failure can leave a state file written without
// fsync, is reported as absent (fs.ErrNotExist) and logged.
func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		klog.ErrorS(err, "Ignoring a torn state file (left by a power failure?)", "path", path, "bytes", len(data))
		return fmt.Errorf("decode %s: %w", path, fs.ErrNotExist)
	}
	return nil
}

// syncDir fsyncs a directory, making the renames and creations in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
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
