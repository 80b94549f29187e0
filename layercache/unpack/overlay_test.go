package unpack

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOverlayMount is the end-to-end proof: two layers unpacked by Apply,
// stacked by the kernel's overlayfs, show exactly the merged tree an image
// runtime would show.
func TestOverlayMount(t *testing.T) {
	requireRoot(t)
	tmp := t.TempDir()
	lower, upper, merged := filepath.Join(tmp, "lower"), filepath.Join(tmp, "upper"), filepath.Join(tmp, "merged")
	for _, d := range []string{lower, upper, merged} {
		must(t, os.Mkdir(d, 0o755))
	}
	apply := func(dir string, entries ...ent) {
		t.Helper()
		if _, err := Apply(context.Background(), dir, bytes.NewReader(makeTar(t, entries...))); err != nil {
			t.Fatalf("Apply %s: %v", filepath.Base(dir), err)
		}
	}
	apply(lower,
		file("top-gone", "g"), file("top-kept", "k"),
		dir("a/"), file("a/gone", "g"), file("a/kept", "k"),
		dir("opq/"), file("opq/old1", "1"), dir("opq/olddir/"), file("opq/olddir/x", "x"),
		dir("c/"), dir("c/d/"), file("c/d/deep", "d"),
		file("replaced", "lower"),
		symlink("link", "a/kept"),
	)
	apply(upper,
		file(".wh.top-gone", ""),
		dir("a/"), file("a/.wh.gone", ""), file("a/added", "new"),
		dir("opq/"), file("opq/.wh..wh..opq", ""), file("opq/new", "n"),
		file(".wh.c", ""),
		file("replaced", "upper"),
		file(".wh.link", ""),
	)
	// overlayfs lowerdir order is top:...:bottom. With lowers only, the
	// mount is read-only, as a read-only publish is.
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, "lowerdir="+upper+":"+lower); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", merged, err)
		}
	})

	var got []string
	err := filepath.WalkDir(merged, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(merged, p)
		if rel != "." {
			got = append(got, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk merged view: %v", err)
	}
	sort.Strings(got)
	want := []string{"a", "a/added", "a/kept", "opq", "opq/new", "replaced", "top-kept"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("merged view:\nwant %v\ngot  %v", want, got)
	}
	for name, content := range map[string]string{"replaced": "upper", "a/kept": "k", "a/added": "new", "opq/new": "n"} {
		if b, err := os.ReadFile(filepath.Join(merged, name)); err != nil || string(b) != content {
			t.Errorf("merged %s: want %q, got %q, %v", name, content, b, err)
		}
	}
	for _, gone := range []string{"top-gone", "a/gone", "opq/old1", "opq/olddir", "c", "c/d/deep", "link"} {
		if _, err := os.Lstat(filepath.Join(merged, gone)); !os.IsNotExist(err) {
			t.Errorf("merged %s: want it hidden, Lstat says %v", gone, err)
		}
	}
}
