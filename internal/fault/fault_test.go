package fault

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"
)

func TestOf(t *testing.T) {
	errBusy := New(Busy, "busy")
	errGone := New(NotFound, "gone")
	for _, tc := range []struct {
		name string
		err  error
		want Kind
	}{
		{"nil", nil, Internal},
		{"plain", errors.New("boom"), Internal},
		{"sentinel", errBusy, Busy},
		{"wrapped sentinel", fmt.Errorf("publish: %w", errGone), NotFound},
		{"Errorf", Errorf(errBusy, "volume %s is busy", "v"), Busy},
		{"Errorf wrapped", fmt.Errorf("outer: %w", Errorf(errGone, "x")), NotFound},
		{"joined: the first sentinel", errors.Join(errors.New("x"), errGone, errBusy), NotFound},
		{"sentinel beats the context", fmt.Errorf("%w: %w", errGone, context.Canceled), NotFound},
		{"deadline", fmt.Errorf("pull: %w", context.DeadlineExceeded), Deadline},
		{"canceled", context.Canceled, Canceled},
		{"ENOSPC", &fs.PathError{Op: "write", Path: "/x", Err: syscall.ENOSPC}, NoSpace},
		{"EDQUOT", syscall.EDQUOT, NoSpace},
		{"EIO", &fs.PathError{Op: "read", Path: "/x", Err: syscall.EIO}, IO},
		{"EROFS", syscall.EROFS, IO},
	} {
		if got := Of(tc.err); got != tc.want {
			t.Errorf("%s: Of(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

func TestErrorfKeepsMessageAndIdentity(t *testing.T) {
	errBusy := New(Busy, "busy")
	err := Errorf(errBusy, "another operation on volume %s is in progress", "v1")
	if err.Error() != "another operation on volume v1 is in progress" {
		t.Errorf("message %q", err)
	}
	if !errors.Is(err, errBusy) {
		t.Error("Errorf's error is not its sentinel")
	}
	if errors.Is(err, New(Busy, "busy")) {
		t.Error("two sentinels of one kind and text are the same error")
	}
}

func TestKindsHaveNames(t *testing.T) {
	for k := Internal; k <= Deadline; k++ {
		if s := k.String(); s == "" || s[0] == 'k' {
			t.Errorf("kind %d has no name: %q", k, s)
		}
	}
}
