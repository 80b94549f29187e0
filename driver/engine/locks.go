package engine

import (
	"sync"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
)

// Locks holds the keys of publishes and clones with a call in progress. A
// second call on the same key fails fast with ErrBusy (kubelet retries)
// instead of queueing behind a pull that may take minutes. The CSI front
// takes a key for each call; the clone sweep takes a clone's.
type Locks struct {
	mu   sync.Mutex
	keys map[string]bool
}

// TryLock takes key, or returns an ErrBusy whose message is what says what
// is busy ("volume v at /target"). The caller calls the returned unlock
// once done.
func (l *Locks) TryLock(key, what string) (unlock func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil {
		l.keys = map[string]bool{}
	}
	if l.keys[key] {
		return nil, fault.Errorf(ErrBusy, "another operation on %s is in progress", what)
	}
	l.keys[key] = true
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		delete(l.keys, key)
	}, nil
}

// PublishLock is the lock key of the publish of volumeID at a target path.
func PublishLock(volumeID, targetPath string) string { return state.Key(volumeID, targetPath) }

// CloneLock is the lock key of clone id's stage, unstage and removal.
func CloneLock(id string) string { return "clone\x00" + id }
