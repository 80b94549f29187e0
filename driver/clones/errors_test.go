package clones

import (
	"testing"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
)

// TestSentinelKinds: a clone in use is FailedPrecondition at the CSI front.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrInUse":      {Err: ErrInUse, Kind: fault.Precondition},
		"ErrShrink":     {Err: ErrShrink, Kind: fault.OutOfRange},
		"ErrTooBig":     {Err: ErrTooBig, Kind: fault.NoSpace},
		"ErrNoClone":    {Err: ErrNoClone, Kind: fault.NotFound},
		"ErrNoCapacity": {Err: ErrNoCapacity, Kind: fault.OutOfRange},
		"ErrNoSource":   {Err: ErrNoSource, Kind: fault.Precondition},
	})
}
