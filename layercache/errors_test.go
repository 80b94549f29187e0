package layercache

import (
	"errors"
	"testing"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
	"github.com/strata-csi/strata/layercache/unpack"
)

// TestSentinelKinds walks every sentinel of layercache and of its unpack
// package through fault.Of: the gRPC codes, metrics kinds and exit codes
// are chosen from these kinds, so a sentinel without one would surface as
// Internal.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrInvalidReference": {Err: ErrInvalidReference, Kind: fault.Invalid},
		"ErrNotFound":         {Err: ErrNotFound, Kind: fault.NotFound},
		"ErrNotCached":        {Err: ErrNotCached, Kind: fault.NotCached},
		"ErrUnauthorized":     {Err: ErrUnauthorized, Kind: fault.Denied},
		"ErrUnavailable":      {Err: ErrUnavailable, Kind: fault.Unavailable},
		"ErrDigestMismatch":   {Err: ErrDigestMismatch, Kind: fault.Corrupt},
		"ErrUnsafeLayer":      {Err: ErrUnsafeLayer, Kind: fault.Unsafe},
		"ErrUnsupported":      {Err: ErrUnsupported, Kind: fault.Invalid},
		"ErrLayerMissing":     {Err: ErrLayerMissing, Kind: fault.Busy},
		"ErrCorruptLayer":     {Err: ErrCorruptLayer, Kind: fault.Corrupt},
		"ErrNoSpace":          {Err: ErrNoSpace, Kind: fault.NoSpace},
		"ErrLayerTooLarge":    {Err: ErrLayerTooLarge, Kind: fault.NoSpace},
	})
	faulttest.CheckKinds(t, "unpack", map[string]faulttest.Want{
		"ErrUnsafe": {Err: unpack.ErrUnsafe, Kind: fault.Unsafe},
	})
	// A layer past its limit is also ErrNoSpace (docs/layercache.md), and
	// the two stay distinct errors.
	if !errors.Is(ErrLayerTooLarge, ErrNoSpace) || errors.Is(ErrNoSpace, ErrLayerTooLarge) {
		t.Error("ErrLayerTooLarge must be ErrNoSpace, and not the other way round")
	}
	if ErrUnsafeLayer != unpack.ErrUnsafe {
		t.Error("ErrUnsafeLayer is not unpack.ErrUnsafe")
	}
	// The texts are part of every message an operator reads.
	for err, text := range map[error]string{
		ErrInvalidReference: "invalid image reference", ErrNotFound: "not found in registry",
		ErrNotCached: "image not cached", ErrUnauthorized: "registry refused access",
		ErrUnavailable: "registry unavailable", ErrDigestMismatch: "digest mismatch",
		ErrUnsafeLayer: "unsafe layer", ErrUnsupported: "unsupported image",
		ErrLayerMissing: "layer not in cache", ErrCorruptLayer: "corrupt layer",
		ErrNoSpace: "cache budget exceeded", ErrLayerTooLarge: "layer too large",
	} {
		if err.Error() != text {
			t.Errorf("sentinel text %q, want %q", err.Error(), text)
		}
	}
}
