package volumes

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
