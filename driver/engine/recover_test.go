package engine

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
)

// TestRecoverMarksAndSweeps: one pass over the owners of cache references
// against the records keeps exactly the owners that still exist: a publish
// whose target is mounted, every clone with a record (and one whose record
// is unreadable), the images still prepulled, and owners the driver did
// not make; it releases a publish that is gone or no longer mounted, a
// clone that is gone, and an image no longer prepulled.
func TestRecoverMarksAndSweeps(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test bind-mounts a target and must run as root")
	}
	root := t.TempDir()
	e, store := newTestEngine(t, root, nil)

	digest := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
	publish := func(volID string, mounted bool) string {
		target := filepath.Join(t.TempDir(), "mount")
		if err := os.MkdirAll(target, 0o750); err != nil {
			t.Fatal(err)
		}
		key := state.Key(volID, target)
		p := state.Publish(root, key)
		if err := os.MkdirAll(p.Dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := state.Write(p.Record, &state.Record{VolumeID: volID, TargetPath: target, Image: "r/x:v1", Digest: digest}); err != nil {
			t.Fatal(err)
		}
		if mounted {
			if err := mount.Bind(t.TempDir(), target, true); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = mount.Unmount(target) })
		}
		return state.PublishOwner(key)
	}
	live := publish("live", true)
	stale := publish("stale", false)
	gone := state.PublishOwner(state.Key("gone", "/nowhere"))
	if err := state.WriteClone(root, &state.Clone{VolumeID: "strata-kept", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	torn := state.ClonePathsOf(root, "strata-torn")
	if err := os.MkdirAll(torn.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(torn.Record, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	owners := map[string]bool{ // owner: kept by Recover
		live: true, stale: false, gone: false,
		state.CloneOwner("strata-kept"): true, state.CloneOwner("strata-torn"): true, state.CloneOwner("strata-gone"): false,
		state.PrepullOwner("r/listed:v1"): true, state.PrepullOwner("r/dropped:v1"): false,
		"someone-else": true,
	}
	for o := range owners {
		if err := store.Acquire(o, nil); err != nil {
			t.Fatal(err)
		}
	}

	if err := e.Recover([]string{"r/listed:v1"}); err != nil {
		t.Fatal(err)
	}
	have, err := store.Owners()
	if err != nil {
		t.Fatal(err)
	}
	for o, kept := range owners {
		if _, ok := have[o]; ok != kept {
			t.Errorf("owner %q held after Recover: %v, want %v", o, ok, kept)
		}
	}
	var left []string
	if err := state.Each(root, func(key string, _ *state.Record) error { left = append(left, key); return nil }); err != nil {
		t.Fatal(err)
	}
	if want := []string{live}; !slices.Equal(left, want) {
		t.Errorf("publishes left %v, want only the mounted one %v", left, want)
	}
}
