package state

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestCloneRecordRoundTrip(t *testing.T) {
	root := t.TempDir()
	if cs, err := ListClones(root); err != nil || len(cs) != 0 {
		t.Fatalf("ListClones of a root without clones = %v, %v; want none", cs, err)
	}
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("cd", 32)}
	l := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ef", 32)}
	now := time.Now().UTC().Truncate(time.Second)
	b := Clone{VolumeID: "strata-b", CapacityBytes: 1 << 30, Stack: []StackImage{{Image: "r/x:v1", Digest: d}}, Layers: []v1.Hash{l}, Created: now}
	a := Clone{VolumeID: "strata-a", CapacityBytes: 5 << 20, Stack: []StackImage{{Image: "r/x:v1", Digest: d}, {Image: "r/y:v2", Digest: d}}, Created: now}
	for _, c := range []*Clone{&b, &a} {
		if err := WriteClone(root, c); err != nil {
			t.Fatal(err)
		}
	}
	// A directory without a record (a removal that crashed) is no clone.
	if err := os.MkdirAll(filepath.Join(root, ClonesDir, "half-gone"), 0o700); err != nil {
		t.Fatal(err)
	}
	got, err := ListClones(root)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Clone{a, b}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListClones = %+v\nwant %+v", got, want)
	}
	if c, err := ReadClone(root, "strata-none"); c != nil || err != nil {
		t.Errorf("ReadClone of a missing clone = %v, %v; want nil, nil", c, err)
	}
	if refs := a.Refs(); !reflect.DeepEqual(refs, []string{"r/x:v1", "r/y:v2"}) {
		t.Errorf("Refs = %v", refs)
	}
	if a.Owner() != "clone/strata-a" {
		t.Errorf("Owner = %q, want clone/strata-a", a.Owner())
	}
	if got, want := CloneUpper(root, "strata-a"), filepath.Join(root, "clones", "strata-a", "fs", "upper"); got != want {
		t.Errorf("CloneUpper = %s, want %s", got, want)
	}
	// A record that does not decode is an error, not "no clone": it pins a
	// base that must never silently change.
	if err := os.WriteFile(filepath.Join(CloneDir(root, "strata-a"), CloneFile), []byte(`{"volumeID": "strata-a", "capa`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadClone(root, "strata-a"); err == nil {
		t.Error("ReadClone of a corrupt record succeeded")
	}
}

func TestCloneStage(t *testing.T) {
	root := t.TempDir()
	if err := WriteClone(root, &Clone{VolumeID: "v1"}); err != nil {
		t.Fatal(err)
	}
	if s, err := ReadCloneStage(root, "v1"); s != nil || err != nil {
		t.Fatalf("ReadCloneStage before a stage = %v, %v", s, err)
	}
	want := CloneStage{StagingPath: "/var/lib/kubelet/x/globalmount", ReadOnly: true, Staged: time.Now().UTC().Truncate(time.Second)}
	if err := WriteCloneStage(root, "v1", &want); err != nil {
		t.Fatal(err)
	}
	if s, err := ReadCloneStage(root, "v1"); err != nil || s == nil || *s != want {
		t.Fatalf("ReadCloneStage = %+v, %v; want %+v", s, err, want)
	}
	for range 2 {
		if err := RemoveCloneStage(root, "v1"); err != nil {
			t.Fatal(err)
		}
	}
	if s, err := ReadCloneStage(root, "v1"); s != nil || err != nil {
		t.Fatalf("ReadCloneStage after RemoveCloneStage = %v, %v", s, err)
	}
}

func TestCheckCloneID(t *testing.T) {
	for _, ok := range []string{"strata-0123abcd", "pvc-1", "a.b_c-D", strings.Repeat("x", 128)} {
		if err := CheckCloneID(ok); err != nil {
			t.Errorf("CheckCloneID(%q) = %v, want ok", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", "../x", "a b", "vol\x00", strings.Repeat("x", 129), "ü"} {
		if err := CheckCloneID(bad); err == nil {
			t.Errorf("CheckCloneID(%q) = nil, want an error", bad)
		}
		if err := WriteClone(t.TempDir(), &Clone{VolumeID: bad}); err == nil {
			t.Errorf("WriteClone with id %q succeeded", bad)
		}
	}
}
