package driver

import (
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/internal/fault"
)

// invalid is an InvalidArgument error of the front's own checks of a
// request.
func invalid(format string, args ...any) error {
	return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
}

// outOfRange is an OutOfRange error of the front's own checks of a
// request: a capacity the volume cannot take. The CSI front answers it as a
// status itself (as invalid), so that an in-process caller (the resizer)
// sees the code too.
func outOfRange(format string, args ...any) error {
	return status.Error(codes.OutOfRange, fmt.Sprintf(format, args...))
}

// toStatus turns an error into the gRPC status that kubelet and the operator
// see. It is the only place where codes are chosen for the errors of the
// engine, the clones, the layer cache and the kernel: by their kind
// (package fault).
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codeOf(fault.Of(err)), err.Error())
}

// codeOf is the gRPC code of a kind of error.
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
		// Busy: another call holds the volume, or a prune took a layer
		// between Ensure and Acquire every time the call tried; kubelet's
		// retry goes on.
		return codes.Aborted
	case fault.Deadline:
		return codes.DeadlineExceeded
	case fault.OutOfRange:
		// A capacity the volume cannot take (a shrink, a size for the
		// image itself): the caller must change the request (CSI spec,
		// ControllerExpandVolume and NodeExpandVolume errors).
		return codes.OutOfRange
	}
	return codes.Internal
}
