// Package mount holds the kernel mount operations of the strata CSI node
// plugin: overlay mounts of image layers, bind mounts (including binds of a
// sub directory resolved inside an untrusted image tree), unmounts and mount
// point queries.
//
// Everything is done with system calls (the new mount API where the kernel
// has it); mount(8) is never executed. docs/mounting.md describes the
// mounts and the kernel behaviour this package works around.
package mount

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/internal/fault"
)

// MaxLowers is overlayfs's cap on lower layers. The kernel refuses a deeper
// stack with EINVAL ("too many lower directories, limit is 500"); this
// package refuses it earlier, with a clearer error.
const MaxLowers = 500

// ErrTooManyLayers is wrapped when a stack exceeds MaxLowers or, on the
// classic mount(2) fallback, when its mount options do not fit in a page.
var ErrTooManyLayers = fault.New(fault.Invalid, "too many layers")

// ErrRepeatedLower is wrapped when a directory is given twice as a lower:
// overlayfs refuses that with ELOOP. The driver mounts a layer that a stack
// repeats once, at its topmost place, which shows the same tree.
var ErrRepeatedLower = fault.New(fault.Invalid, "repeated lower directory")

// ErrNotDir is wrapped when a path that must be a directory (the source of a
// bind, a sub directory for BindBeneath, an overlay layer) is something else.
var ErrNotDir = fault.New(fault.Invalid, "not a directory")

// openDirPath opens path as an O_PATH directory fd. An O_PATH fd is all the
// mount API needs, and it needs no read permission on the directory.
func openDirPath(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, dirErr(err)
	}
	return fd, nil
}

// dirErr adds ErrNotDir to ENOTDIR so that callers can test for either; the
// errno is kept, so errors.Is(err, fs.ErrNotExist) works for ENOENT.
func dirErr(err error) error {
	if errors.Is(err, unix.ENOTDIR) {
		return notDirError{err}
	}
	return err
}

// notDirError is ENOTDIR that also matches ErrNotDir.
type notDirError struct{ errno error }

func (e notDirError) Error() string   { return e.errno.Error() }
func (e notDirError) Unwrap() []error { return []error{ErrNotDir, e.errno} }

// procFdPath is the magic link naming fd in this process. The kernel follows
// it to the very directory the fd was opened on, so it is a short, fixed-size
// stand-in for a path of any length (and contains no ',' or ':' that would
// need escaping in mount options).
func procFdPath(fd int) string {
	return fmt.Sprintf("/proc/self/fd/%d", fd)
}

// fsContextMessages drains the kernel's log of an fs context (fsopen fd).
// Each read(2) returns one message such as "e overlay: Unknown parameter
// 'x'"; ENODATA ends the log. These messages are what an operator needs to
// understand an EINVAL, so they go into the returned errors.
func fsContextMessages(fsfd int) string {
	var msgs []string
	buf := make([]byte, 4096)
	for i := 0; i < 64; i++ { // the kernel keeps at most 8; bound the loop anyway
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	return strings.Join(msgs, "; ")
}

// withKernelMessages appends the fs context messages to err. Overlayfs
// reports option errors through the fs context, but most errors found while
// building the superblock (upper and work on different mounts, a lower that
// is an upper elsewhere, ...) only with pr_err: then the error says so.
func withKernelMessages(fsfd int, err error) error {
	if m := fsContextMessages(fsfd); m != "" {
		return fmt.Errorf("%w [kernel: %s]", err, m)
	}
	return fmt.Errorf("%w (no message from the kernel here; overlayfs may have logged the reason to the kernel log, see dmesg)", err)
}
