package clones

import (
	"testing"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
)

// TestSentinelKinds: a clone in use is FailedPrecondition at the CSI front.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrInUse": {Err: ErrInUse, Kind: fault.Precondition},
	})
}
