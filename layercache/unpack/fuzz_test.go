package unpack

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzApply feeds Apply layers built from a small text script (see
// encodeScript); raw tar bytes would mostly die on header checksums before
// reaching Apply. Whatever the layer, Apply must not panic, must not create or
// change anything outside its target, and on success must leave no ".wh."
// name behind.
//
//	go test -fuzz=FuzzApply ./layercache/unpack
func FuzzApply(f *testing.F) {
	requireRoot(f)
	for _, tc := range breakouts() {
		if tc.abs == nil {
			f.Add(encodeScript(tc.entries))
		}
	}
	f.Add(encodeScript([]ent{
		dir("a/"), file("a/f", "hello"), symlink("a/l", "f"), hardlink("a/h", "a/f"),
		file("a/.wh.x", ""), file("a/.wh..wh..opq", ""), fifo("a/p"), file("b/c/d", "implied"),
	}))
	f.Add(encodeScript([]ent{
		dir("d/"), file("d/x", "x"), symlink("d", "../outside"), file("d/victim", "pwned"),
		symlink("e", "d"), hardlink("e/h", "d/x"), file("/..//../outside/dir/victim2", "x"),
	}))
	f.Add([]byte("x|f|user.k=v|644|\"data\"\nx|g|trusted.overlay.redirect=/..|644|\"\"\n"))

	f.Fuzz(func(t *testing.T, script []byte) {
		data := tarFromScript(script)
		tmp := t.TempDir()
		s := sandbox{tmp: tmp, layer: filepath.Join(tmp, "a", "layer"), outside: filepath.Join(tmp, "a", "outside")}
		must(t, os.MkdirAll(s.layer, 0o755))
		must(t, os.MkdirAll(filepath.Join(s.outside, "dir"), 0o755))
		must(t, os.WriteFile(filepath.Join(s.outside, "victim"), []byte("sentinel"), 0o644))
		must(t, os.WriteFile(filepath.Join(s.outside, "dir", "victim2"), []byte("sentinel2"), 0o644))
		must(t, os.Symlink("victim", filepath.Join(s.outside, "link")))
		before := snapshot(t, tmp, s.layer)
		beforeOutside := snapshot(t, s.outside, s.layer)

		_, err := Apply(context.Background(), s.layer, bytes.NewReader(data))

		if diffs := diffSnapshots(before, snapshot(t, tmp, s.layer)); len(diffs) > 0 {
			t.Fatalf("Apply (err: %v) changed things outside the layer:\n%v", err, diffs)
		}
		var ue *UnsafeError
		if errors.Is(err, ErrUnsafe) != errors.As(err, &ue) {
			t.Fatalf("error %v: errors.Is(ErrUnsafe) and errors.As(*UnsafeError) disagree", err)
		}
		if err == nil {
			assertNoWhiteoutNames(t, s.layer)
		}
		// As the caller does on error (and the test's cleanup would anyway):
		// removing the layer must not reach outside either.
		must(t, os.RemoveAll(s.layer))
		if diffs := diffSnapshots(beforeOutside, snapshot(t, s.outside, s.layer)); len(diffs) > 0 {
			t.Fatalf("removing the layer changed things outside it:\n%v", diffs)
		}
	})
}
