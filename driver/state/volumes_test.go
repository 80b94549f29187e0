package state

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func write(t *testing.T, root, key string, r *Record) {
	t.Helper()
	dir := filepath.Join(root, Dir, key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Write(filepath.Join(dir, RecordFile), r); err != nil {
		t.Fatal(err)
	}
}

func TestListReadsWhatWriteWrote(t *testing.T) {
	root := t.TempDir()
	if vols, err := List(root); err != nil || len(vols) != 0 {
		t.Fatalf("List of a root the plugin never used = %v, %v; want none", vols, err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
	web := Record{VolumeID: "v1", TargetPath: "/t1", Image: "r/x:v1", Digest: d, Published: now, PodNamespace: "shop", PodName: "web-0", PodUID: "u1"}
	write(t, root, "bbbb", &web)
	write(t, root, "aaaa", &Record{VolumeID: "v2", TargetPath: "/t2", Image: "r/x:v1", Digest: d, Published: now})
	// A record torn by a power failure counts as none.
	if err := os.MkdirAll(filepath.Join(root, Dir, "cccc"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, Dir, "cccc", RecordFile), []byte(`{"volumeID": "v3", "targ`), 0o600); err != nil {
		t.Fatal(err)
	}

	vols, err := List(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 2 || vols[0].Key != "aaaa" || vols[1].Key != "bbbb" {
		t.Fatalf("List = %+v, want aaaa and bbbb", vols)
	}
	if got := vols[1].Record; got.Pod() != "shop/web-0" || got.PodUID != "u1" || !got.SameRequest(&web) {
		t.Errorf("record bbbb = %+v, want %+v", got, web)
	}
	if got := vols[0].Pod(); got != "" {
		t.Errorf("record without a pod: Pod() = %q, want empty", got)
	}
	// Without a pod, the record has no pod keys: records stay readable by
	// an older plugin, and read the same.
	data, err := os.ReadFile(filepath.Join(root, Dir, "aaaa", RecordFile))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), "pod") {
		t.Errorf("record without a pod mentions one:\n%s", data)
	}
}

// TestStackOfOldRecords: a record written before stacks existed (only image
// and digest) reads as a stack of that one image, and is the same request
// as a one-image publish that records its stack.
func TestStackOfOldRecords(t *testing.T) {
	root := t.TempDir()
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("cd", 32)}
	dir := filepath.Join(root, Dir, "old")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	old := `{"volumeID":"v","targetPath":"/t","image":"r/ds:v1","pullPolicy":"IfNotPresent","readOnly":false,` +
		`"digest":"` + d.String() + `","layers":["` + d.String() + `"],"published":"2025-01-01T00:00:00Z"}`
	if err := os.WriteFile(filepath.Join(dir, RecordFile), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	rec, err := Read(filepath.Join(dir, RecordFile))
	if err != nil || rec == nil {
		t.Fatalf("Read old record = %v, %v", rec, err)
	}
	if got := rec.Images(); len(got) != 1 || got[0].Image != "r/ds:v1" || got[0].Digest != d {
		t.Errorf("old record's stack = %+v, want [r/ds:v1@%s]", got, d)
	}
	base := Record{VolumeID: "v", TargetPath: "/t", Image: "r/ds:v1", PullPolicy: "IfNotPresent"}
	one := base
	one.Stack = []StackImage{{Image: "r/ds:v1"}}
	if !rec.SameRequest(&one) || !rec.SameRequest(&base) {
		t.Error("an old one-image record is not the same request as a one-image publish")
	}
	for name, stack := range map[string][]string{
		"another image above": {"r/ds:v1", "r/tools:v1"},
		"the order reversed":  {"r/tools:v1", "r/ds:v1"},
	} {
		o := base
		o.Stack = nil
		for _, ref := range stack {
			o.Stack = append(o.Stack, StackImage{Image: ref})
		}
		if rec.SameRequest(&o) {
			t.Errorf("%s: the same request as the one-image record", name)
		}
	}
	two := base
	two.Stack = []StackImage{{Image: "r/ds:v1", Digest: d}, {Image: "r/tools:v1"}}
	same := base
	same.Stack = []StackImage{{Image: "r/ds:v1"}, {Image: "r/tools:v1"}}
	if !two.SameRequest(&same) {
		t.Error("the same stack (digests aside) is not the same request")
	}
}
