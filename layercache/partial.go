package layercache

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// partialDir keeps the downloads of large raw files (a model's weights) that
// have not finished, with their progress (package rangefetch's sidecar),
// across restarts: a 20 GB transfer that kubelet's deadline, a crash or a
// plugin upgrade cut resumes from its verified bytes in the next process,
// instead of starting over. Unlike tmp/, it is not emptied at start.
const partialDir = "partial"

// partialMaxAge is how long a partial download that nobody resumes is
// kept: Open removes older ones (Prune removes every one not in use).
const partialMaxAge = 24 * time.Hour

// partialPath is where blob d is downloaded while it is partial.
func (s *Store) partialPath(d v1.Hash) string {
	return filepath.Join(s.root, partialDir, d.Algorithm+"-"+d.Hex)
}

// claimPartial returns where this process downloads blob d so that the
// download can resume after a restart, and the function that releases it
// (done: the download finished and its file was moved away, so the lock
// file goes too). A lock file removed while another process opens it can
// let two processes write one partial file: the digest, checked at the
// end, then fails them both, and the next try starts clean.
// ok is false when another process (the plugin and `strata pull` share a
// store) is downloading d there now: the caller then downloads into its
// own work directory, without resuming.
func (s *Store) claimPartial(d v1.Hash) (path string, release func(done bool), ok bool, err error) {
	if err := checkDigest(d); err != nil {
		return "", nil, false, err
	}
	path = s.partialPath(d)
	lock, err := os.OpenFile(path+".lock", os.O_RDONLY|os.O_CREATE, 0o600)
	if err != nil {
		return "", nil, false, err
	}
	for {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if errors.Is(err, unix.EWOULDBLOCK) {
		lock.Close()
		return "", nil, false, nil
	}
	if err != nil {
		lock.Close()
		return "", nil, false, &os.PathError{Op: "flock", Path: path + ".lock", Err: err}
	}
	return path, func(done bool) {
		if done {
			os.Remove(path + ".lock")
		}
		lock.Close()
	}, true, nil
}

// sweepPartials removes the partial downloads that no process holds and
// that were last written more than maxAge ago (every one not held, for
// maxAge 0), with their progress and lock files.
func (s *Store) sweepPartials(maxAge time.Duration) error {
	dir := filepath.Join(s.root, partialDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".lock")
		if !ok {
			continue
		}
		base := filepath.Join(dir, name)
		if maxAge > 0 {
			if fi, err := os.Stat(base); err == nil && time.Since(fi.ModTime()) < maxAge {
				continue
			}
		}
		lock, err := os.Open(base + ".lock")
		if err != nil {
			continue
		}
		if unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			lock.Close() // a live download
			continue
		}
		klog.V(2).InfoS("Removing a partial download", "path", base)
		for _, p := range []string{base, base + ".progress", base + ".lock"} {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				lock.Close()
				return fmt.Errorf("remove partial download %s: %w", p, err)
			}
		}
		lock.Close()
	}
	return nil
}
