package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/layercache"
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
	code := codes.Internal
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled), errors.Is(err, layercache.ErrLayerMissing):
		// ErrLayerMissing: a prune took a layer between Ensure and Acquire
		// every time the call tried; kubelet's retry ensures it again.
		code = codes.Aborted
	case errors.Is(err, layercache.ErrInvalidReference), errors.Is(err, layercache.ErrUnsupported),
		errors.Is(err, mount.ErrTooManyLayers):
		code = codes.InvalidArgument
	case errors.Is(err, layercache.ErrNotFound), errors.Is(err, layercache.ErrNotCached):
		code = codes.NotFound
	case errors.Is(err, layercache.ErrUnauthorized):
		code = codes.PermissionDenied
	case errors.Is(err, layercache.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, layercache.ErrDigestMismatch), errors.Is(err, layercache.ErrCorruptLayer):
		code = codes.DataLoss
	case errors.Is(err, layercache.ErrUnsafeLayer):
		code = codes.FailedPrecondition
	case errors.Is(err, layercache.ErrNoSpace), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		code = codes.ResourceExhausted
	}
	return status.Error(code, err.Error())
}
