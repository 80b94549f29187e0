package engine

import (
	"testing"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
)

// TestSentinelKinds walks every sentinel of the engine through fault.Of:
// the CSI front chooses its gRPC code by that kind.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrBusy":         {Err: ErrBusy, Kind: fault.Busy},
		"ErrInvalid":      {Err: ErrInvalid, Kind: fault.Invalid},
		"ErrConflict":     {Err: ErrConflict, Kind: fault.Exists},
		"ErrNotStaged":    {Err: ErrNotStaged, Kind: fault.Precondition},
		"ErrBaseChanged":  {Err: ErrBaseChanged, Kind: fault.Precondition},
		"ErrNotPublished": {Err: ErrNotPublished, Kind: fault.NotFound},
		"ErrSingleWriter": {Err: ErrSingleWriter, Kind: fault.Precondition},
	})
}

// TestLocks: a held key refuses a second taker with ErrBusy naming what is
// busy, other keys are free, and unlock frees the key.
func TestLocks(t *testing.T) {
	var l Locks
	unlock, err := l.TryLock(PublishLock("v", "/t"), "volume v at /t")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.TryLock(PublishLock("v", "/t/"), "volume v at /t/"); fault.Of(err) != fault.Busy || err.Error() != "another operation on volume v at /t/ is in progress" {
		t.Errorf("second lock of the same publish: %v", err)
	}
	other, err := l.TryLock(CloneLock("v"), "volume v")
	if err != nil {
		t.Errorf("a clone's lock is not a publish's: %v", err)
	} else {
		other()
	}
	unlock()
	again, err := l.TryLock(PublishLock("v", "/t"), "volume v at /t")
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	again()
}
