// Package fault is Strata's one error vocabulary. Domain packages
// (layercache, the mount package, the volume engine, clones) define their
// sentinel errors with New, giving each a Kind; Of classifies any error by
// the sentinel it wraps, by the end of its context, or by the errno of a
// full or failing disk. Each boundary maps a Kind to its own words once: the
// CSI front to a gRPC code, the metrics to a registry error kind, the strata
// CLI to an exit code.
package fault

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Kind is what went wrong, as a caller acts on it.
type Kind uint8

// Kinds. The zero Kind is Internal: an error no sentinel explains.
const (
	Internal     Kind = iota
	Invalid           // the request is wrong: a bad reference, attribute or argument; retrying will not help
	NotFound          // the registry, or the node, has no such thing
	NotCached         // pull policy Never and the image is not in the cache
	Denied            // the registry refused the credentials, or the cache refused to share private content
	Unavailable       // the registry could not be reached, timed out or was overloaded
	Corrupt           // a digest did not match, or a layer did not decode: nothing was kept
	Unsafe            // a layer tries to write outside itself: nothing was kept
	NoSpace           // the cache budget, a cap or the disk is full
	IO                // the node's disk failed (EIO) or is read-only
	Exists            // the thing exists already with other arguments
	Busy              // another operation holds it, or a race was lost: retry
	Precondition      // the system is not in the state the call needs (in use, not staged, base moved)
	Canceled          // the caller gave up
	Deadline          // the caller's deadline passed
	OutOfRange        // the size asked for is one the thing cannot take (a shrink, a size for a volume without one)
)

var kindNames = [...]string{
	Internal: "internal", Invalid: "invalid", NotFound: "not found", NotCached: "not cached",
	Denied: "denied", Unavailable: "unavailable", Corrupt: "corrupt", Unsafe: "unsafe",
	NoSpace: "no space", IO: "i/o", Exists: "exists", Busy: "busy", Precondition: "precondition",
	Canceled: "canceled", Deadline: "deadline", OutOfRange: "out of range",
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", k)
}

// sentinel is an error of a known Kind, compared by identity.
type sentinel struct {
	kind Kind
	msg  string
}

func (e *sentinel) Error() string { return e.msg }

// New returns a sentinel error of kind k: a distinct value for errors.Is,
// which Of classifies as k wherever it is wrapped.
func New(k Kind, msg string) error { return &sentinel{kind: k, msg: msg} }

// wrapped is an error with its own message that is (errors.Is) a sentinel.
type wrapped struct {
	msg string
	is  error
}

func (e *wrapped) Error() string { return e.msg }
func (e *wrapped) Unwrap() error { return e.is }

// Errorf formats an error whose message is the format alone and which is
// (errors.Is) the sentinel is, classified as is. Use it where the message
// says all there is and the sentinel's own text would only repeat it.
func Errorf(is error, format string, args ...any) error {
	return &wrapped{msg: fmt.Sprintf(format, args...), is: is}
}

// Of classifies err: the Kind of the first sentinel made by New that it
// wraps, else of the end of a context, else of the errno of a full or
// failing disk; Internal for anything else, and for nil.
func Of(err error) Kind {
	if err == nil {
		return Internal
	}
	var s *sentinel
	if errors.As(err, &s) {
		return s.kind
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return Deadline
	case errors.Is(err, context.Canceled):
		return Canceled
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return NoSpace
	case errors.Is(err, syscall.EIO), errors.Is(err, syscall.EROFS):
		return IO
	}
	return Internal
}
