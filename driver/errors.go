package driver

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/internal/fault"
)

// statusError carries a gRPC code chosen where the situation is understood
// (argument checks, per-volume conflicts); everything else is classified by
// toStatus from the sentinel errors it wraps.
type statusError struct {
	code codes.Code
	msg  string
}

func (e *statusError) Error() string { return e.msg }

// GRPCStatus gives the error its code where the driver is called in-process
// (the controller's provisioner), not only through the gRPC server.
func (e *statusError) GRPCStatus() *status.Status { return status.New(e.code, e.msg) }

func errorf(code codes.Code, format string, args ...any) error {
	return &statusError{code: code, msg: fmt.Sprintf(format, args...)}
}

// invalid is an InvalidArgument error.
func invalid(format string, args ...any) error {
	return errorf(codes.InvalidArgument, format, args...)
}

// toStatus turns an error into the gRPC status that kubelet and the operator
// see. It is the only place where codes are chosen for errors that come from
// the layer cache or the kernel.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var se *statusError
	if errors.As(err, &se) {
		return status.Error(se.code, err.Error())
	}
	return status.Error(codeOf(fault.Of(err)), err.Error())
}

// codeOf is the gRPC code of an error of kind k.
func codeOf(k fault.Kind) codes.Code {
	switch k {
	case fault.Invalid:
		return codes.InvalidArgument
	case fault.NotFound, fault.NotCached:
		return codes.NotFound
	case fault.Denied:
		return codes.PermissionDenied
	case fault.Unavailable:
		return codes.Unavailable
	case fault.Corrupt:
		return codes.DataLoss
	case fault.Unsafe, fault.Precondition:
		return codes.FailedPrecondition
	case fault.NoSpace:
		return codes.ResourceExhausted
	case fault.Exists:
		return codes.AlreadyExists
	case fault.Busy, fault.Canceled:
		// Busy: another operation holds the volume, or a race was lost (a
		// prune took a layer between Ensure and Acquire every time the call
		// tried, ErrLayerMissing); kubelet's retry ensures it again.
		return codes.Aborted
	case fault.Deadline:
		return codes.DeadlineExceeded
	}
	return codes.Internal // fault.IO, fault.Internal
}
