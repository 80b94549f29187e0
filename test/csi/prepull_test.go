package csitest

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/test/testimage"
)

// owners reads the owners of the cache references under root.
func owners(t *testing.T, root string) map[string]bool {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "refs", "*.json"))
	out := map[string]bool{}
	for _, f := range files {
		var rec struct{ Owner string }
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if err := json.Unmarshal(data, &rec); err == nil {
			out[rec.Owner] = true
		}
	}
	return out
}

// TestPrepull: --prepull pulls an image at start and keeps it referenced, so
// a prune keeps it; a plugin started without it lets it go.
func TestPrepull(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	reg := testimage.Registry(t)
	ref := reg + "/warm/dataset:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("b", "b")), testimage.Zstd)))

	p := Start(t, Options{Bin: pluginBin, Root: root, Mode: "node", Args: []string{"--prepull", ref}})
	deadline := time.Now().Add(30 * time.Second)
	for !owners(t, root)["prepull:"+ref] {
		if time.Now().After(deadline) {
			t.Fatalf("the image was not prepulled within 30s; owners: %v", owners(t, root))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A prune from the operator CLI's side of the store keeps it.
	s, err := layercache.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if res, err := s.Prune(context.Background()); err != nil || len(res.Layers) != 0 {
		t.Fatalf("prune with the image prepulled = %+v, %v; want nothing removed", res, err)
	}
	if layers, _ := s.Layers(); len(layers) != 2 {
		t.Fatalf("%d layers cached, want 2", len(layers))
	}

	p.Stop()
	Start(t, Options{Bin: pluginBin, Root: root, Mode: "node"})
	if o := owners(t, root); o["prepull:"+ref] {
		t.Fatalf("owners after a start without --prepull: %v, want the prepull released", o)
	}
	if res, err := s.Prune(context.Background()); err != nil || len(res.Layers) != 2 {
		t.Fatalf("prune after the image left the list = %+v, %v; want both layers removed", res, err)
	}
}
