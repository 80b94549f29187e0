package mount

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
)

// TestSentinelKinds walks every sentinel of the package through fault.Of.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrTooManyLayers": {Err: ErrTooManyLayers, Kind: fault.Invalid},
		"ErrRepeatedLower": {Err: ErrRepeatedLower, Kind: fault.Invalid},
		"ErrNotDir":        {Err: ErrNotDir, Kind: fault.Invalid},
	})
	// ENOTDIR from the kernel is ErrNotDir and keeps its errno.
	err := dirErr(unix.ENOTDIR)
	if fault.Of(err) != fault.Invalid || !errors.Is(err, ErrNotDir) || !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("dirErr(ENOTDIR) = %v: kind %v", err, fault.Of(err))
	}
}
