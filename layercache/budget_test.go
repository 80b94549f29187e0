package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// layerCost is what a layer of pushRandom counts against the budget: its
// 1000 bytes of content and its one tar entry.
const layerCost = 1000 + EntryBytes

// pushRandom pushes images a, b, c... of one layer holding 1000 random
// (incompressible) bytes each, and returns their references.
func pushRandom(t *testing.T, reg string, names ...string) []string {
	t.Helper()
	var refs []string
	for _, n := range names {
		b := make([]byte, 1000)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		ref := fmt.Sprintf("%s/%s:v1", reg, n)
		testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("blob", string(b))), testimage.Gzip)))
		refs = append(refs, ref)
	}
	return refs
}

func pullAll(t *testing.T, s *Store, refs ...string) []*Image {
	t.Helper()
	var imgs []*Image
	for _, r := range refs {
		img, err := s.Pull(context.Background(), r, PullOptions{})
		if err != nil {
			t.Fatalf("pull %s: %v", r, err)
		}
		imgs = append(imgs, img)
	}
	return imgs
}

func TestBudgetEvictsLeastRecentlyUsed(t *testing.T) {
	refs := pushRandom(t, testimage.Registry(t), "a", "b", "c")
	// Two layers fit; the third needs room once it is written, and down
	// to the low mark (0.75 of the budget) means one eviction.
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: 3*layerCost - 288, High: 0.9, Low: 0.75, MinAge: time.Nanosecond}))
	imgs := pullAll(t, s, refs[0], refs[1])
	// Use a after b was pulled: b is now the least recently used.
	if err := s.Acquire("vol", imgs[0].DiffIDs()); err != nil {
		t.Fatal(err)
	}
	if err := s.Release("vol"); err != nil {
		t.Fatal(err)
	}
	c := pullAll(t, s, refs[2])[0]
	for _, tc := range []struct {
		name string
		d    v1.Hash
		want bool
	}{{"a (used)", imgs[0].Layers[0].DiffID, true}, {"b (least recently used)", imgs[1].Layers[0].DiffID, false}, {"c (new)", c.Layers[0].DiffID, true}} {
		if got := s.HasLayer(tc.d); got != tc.want {
			t.Errorf("layer of %s cached = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestBudgetNeverEvictsLayersInUse(t *testing.T) {
	refs := pushRandom(t, testimage.Registry(t), "a", "b", "c")
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: 3*layerCost - 288, High: 0.9, Low: 0.7, MinAge: time.Nanosecond}))
	imgs := pullAll(t, s, refs[0], refs[1])
	if err := s.Acquire("vol", append(imgs[0].DiffIDs(), imgs[1].DiffIDs()...)); err != nil {
		t.Fatal(err)
	}
	_, err := s.Pull(context.Background(), refs[2], PullOptions{})
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "needs at least") || !strings.Contains(err.Error(), refs[2]) {
		t.Fatalf("pull over budget with every layer in use = %v, want ErrNoSpace saying how much is needed", err)
	}
	for _, img := range imgs {
		if !s.HasLayer(img.Layers[0].DiffID) {
			t.Errorf("layer in use %s was evicted", img.Layers[0].DiffID)
		}
	}
}

func TestBudgetMinAgeProtectsFreshLayers(t *testing.T) {
	refs := pushRandom(t, testimage.Registry(t), "a", "b", "c")
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: 3*layerCost - 288, High: 0.9, Low: 0.7, MinAge: time.Hour}))
	pullAll(t, s, refs[0], refs[1])
	if _, err := s.Pull(context.Background(), refs[2], PullOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("pull that would evict layers younger than the minimum age = %v, want ErrNoSpace", err)
	}
}

func TestGCHighAndLowWatermarks(t *testing.T) {
	refs := pushRandom(t, testimage.Registry(t), "a", "b", "c")
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	imgs := pullAll(t, s, refs...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Under the high mark: nothing happens.
	s = openStore(t, root, WithBudget(Budget{MaxBytes: 4 * layerCost, High: 0.9, Low: 0.5, MinAge: time.Nanosecond}))
	if res, err := s.GC(context.Background()); err != nil || len(res.Layers) != 0 {
		t.Fatalf("GC under the high watermark = %+v, %v; want nothing evicted", res, err)
	}
	// Three layers over a high mark of 0.9 * 3 layers: evict the oldest
	// down to 1.5 layers.
	s = openStore(t, root, WithBudget(Budget{MaxBytes: 3*layerCost - 288, High: 0.9, Low: 0.5, MinAge: time.Nanosecond}))
	res, err := s.GC(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []v1.Hash{imgs[0].Layers[0].DiffID, imgs[1].Layers[0].DiffID}
	if len(res.Layers) != 2 || res.Layers[0] != want[0] || res.Layers[1] != want[1] {
		t.Errorf("GC evicted %v, want the two oldest %v", res.Layers, want)
	}
	if !s.HasLayer(imgs[2].Layers[0].DiffID) {
		t.Error("GC evicted the newest layer")
	}
}

func TestBudgetValidation(t *testing.T) {
	for _, b := range []Budget{{MaxBytes: -1}, {MaxBytes: 10, High: 0.5, Low: 0.8}, {MaxBytes: 10, High: 1.5}, {MaxBytes: 10, MinAge: -time.Second}} {
		if _, err := Open(t.TempDir(), WithBudget(b)); err == nil {
			t.Errorf("Open with budget %+v succeeded, want an error", b)
		}
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1048576": 1 << 20, "50Gi": 50 << 30, "50G": 50e9, "512Mi": 512 << 20, "2Ti": 2 << 40, "10k": 10000} {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "ten", "5GB", "1.5Gi", "9999999999Ti"} {
		if got, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) = %d, want an error", in, got)
		}
	}
}

func TestBudgetOf(t *testing.T) {
	b, err := BudgetOf(Budget{}, 50, t.TempDir())
	if err != nil || b.MaxBytes <= 0 {
		t.Fatalf("50%% of the test filesystem = %+v, %v", b, err)
	}
	if _, err := BudgetOf(Budget{MaxBytes: 1}, 50, t.TempDir()); err == nil {
		t.Error("bytes and percentage together were accepted")
	}
	if _, err := BudgetOf(Budget{}, 150, t.TempDir()); err == nil {
		t.Error("150% was accepted")
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 1000: "1000", 1 << 10: "1Ki", 100 << 30: "100Gi", 3 << 40: "3Ti", 1<<20 + 1: "1048577"} {
		got := FormatBytes(n)
		if got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
		if back, err := ParseBytes(got); err != nil || back != n {
			t.Errorf("ParseBytes(FormatBytes(%d)) = %d, %v", n, back, err)
		}
	}
}
