package engine

import (
	"testing"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/layercache"
)

// newTestEngine opens a layer cache at root and an engine on it, with no
// credential sources; more sets the rest of the config (metrics, a Kube
// client) from the store. Both are closed when the test ends.
func newTestEngine(t *testing.T, root string, more func(*Config, *layercache.Store)) (*Engine, *layercache.Store) {
	t.Helper()
	store, err := layercache.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	creds, err := credentials.New(credentials.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { creds.Close() })
	cfg := Config{Root: root, DriverName: "strata.csi.dev", NodeID: "n", Store: store, Credentials: creds}
	if more != nil {
		more(&cfg, store)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e, store
}
