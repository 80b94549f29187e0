package state

import (
	"os"
	"path/filepath"
	"testing"
)

// TestUpperLayout: Upper finds a capped upper in the publish's own
// filesystem (fs/upper), and an uncapped one, or one of a record written
// before caps existed, at upper.
func TestUpperLayout(t *testing.T) {
	root := t.TempDir()
	for key, dir := range map[string]string{"capped": filepath.Join(FSDir, UpperDir), "uncapped": UpperDir} {
		want := filepath.Join(root, Dir, key, dir)
		if err := os.MkdirAll(want, 0o755); err != nil {
			t.Fatal(err)
		}
		if got := Upper(root, key); got != want {
			t.Errorf("Upper(%s) = %s, want %s", key, got, want)
		}
	}
	if got, want := Upper(root, "gone"), filepath.Join(root, Dir, "gone", UpperDir); got != want {
		t.Errorf("Upper of a publish without files = %s, want %s", got, want)
	}
}

// TestSameRequestSize: the size attribute is part of the request; the cap
// it came to (the plugin's default may have changed) is not.
func TestSameRequestSize(t *testing.T) {
	base := Record{VolumeID: "v", TargetPath: "/t", Image: "r/i:1", UpperBytes: 10 << 30}
	same := base
	same.UpperBytes = 1 << 30 // another default
	if !base.SameRequest(&same) {
		t.Error("a publish without size differs from one made under another default cap")
	}
	sized := base
	sized.Size = 1 << 30
	if base.SameRequest(&sized) || sized.SameRequest(&base) {
		t.Error("a publish with size is the same request as one without")
	}
}
