package engine

import "github.com/strata-csi/strata/internal/fault"

// The engine's domain errors. Each is a sentinel of package fault: the
// message that reaches the operator is made with fault.Errorf where the
// error happens, and the CSI front turns the sentinel's kind into a gRPC
// code (Busy: Aborted, Exists: AlreadyExists, Precondition:
// FailedPrecondition, NotFound, Invalid: InvalidArgument).
var (
	// ErrBusy: another call works on the same publish or clone; the
	// caller retries.
	ErrBusy = fault.New(fault.Busy, "another operation is in progress")
	// ErrInvalid: the volume's attributes or the request cannot be
	// served as given (an unknown attribute, a bad subPath, a stack
	// deeper than overlayfs mounts).
	ErrInvalid = fault.New(fault.Invalid, "invalid volume request")
	// ErrConflict: the target is published already with other
	// arguments, or is a mount that the plugin did not make.
	ErrConflict = fault.New(fault.Exists, "already published with other arguments")
	// ErrNotStaged: a clone's publish came before its stage, or after its
	// unstage.
	ErrNotStaged = fault.New(fault.Precondition, "volume not staged")
	// ErrBaseChanged: a clone's volume context names other images than
	// the ones it was made from.
	ErrBaseChanged = fault.New(fault.Precondition, "clone base changed")
	// ErrSingleWriter: a single-writer volume is published at another
	// target already.
	ErrSingleWriter = fault.New(fault.Precondition, "single-writer volume in use")
	// ErrNotPublished: no publish of the volume at the path on this node.
	ErrNotPublished = fault.New(fault.NotFound, "volume not published")
)

// invalid is an ErrInvalid with its own message.
func invalid(format string, args ...any) error { return fault.Errorf(ErrInvalid, format, args...) }
