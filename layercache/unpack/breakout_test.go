package unpack

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// outcome is what a breakout case must end in.
type outcome int

const (
	succeeds outcome = iota // Apply succeeds
	isUnsafe                // Apply fails with an error wrapping ErrUnsafe
	rejected                // Apply fails with an ordinary error, not ErrUnsafe
)

func (o outcome) String() string {
	return [...]string{"success", "an ErrUnsafe error", "a non-ErrUnsafe error"}[o]
}

// breakout is a hostile (or tricky but harmless) layer, modelled on
// containerd's TestBreakouts.
type breakout struct {
	name    string
	entries []ent
	want    outcome
	// abs, if set, adds entries that need the sandbox's absolute paths.
	abs func(s sandbox) []ent
	// check, if set, inspects the layer after a successful Apply.
	check func(t *testing.T, layer string)
}

func breakouts() []breakout {
	return []breakout{
		{name: "dotdot", want: isUnsafe, entries: []ent{file("../outside/evil", "x")}},
		{name: "dotdot overwrite sentinel", want: isUnsafe, entries: []ent{file("../outside/victim", "pwned")}},
		{name: "dotdot deep", want: isUnsafe, entries: []ent{file("a/../../../../../outside/evil", "x")}},
		{name: "dotdot only", want: isUnsafe, entries: []ent{dir("..")}},
		{name: "dotdot dir then file", want: isUnsafe, entries: []ent{dir("../evil/"), file("../evil/x", "x")}},
		{name: "absolute inside", want: succeeds, entries: []ent{file("/etc/passwd", "root:x:0:0")},
			check: wantFile("etc/passwd", "root:x:0:0")},
		{name: "absolute many slashes", want: succeeds, entries: []ent{file("///etc//passwd", "r")},
			check: wantFile("etc/passwd", "r")},
		{name: "absolute with dotdot cleaned inside", want: succeeds, entries: []ent{file("/a/../b", "b")},
			check: wantFile("b", "b")},
		{name: "absolute dotdot escapes after strip", want: isUnsafe, entries: []ent{file("/../outside/evil", "x")}},
		{name: "dotdot inside stays inside", want: succeeds, entries: []ent{file("a/b/../../c", "c")},
			check: wantFile("c", "c")},
		{name: "three dots is a name", want: succeeds, entries: []ent{file("...", "d")}, check: wantFile("...", "d")},
		{name: "root dir entry", want: succeeds, entries: []ent{dir("./"), dir("/"), file("./x", "x")}, check: wantFile("x", "x")},
		{name: "root as file", want: rejected, entries: []ent{file(".", "")}},

		{name: "symlink to root then write", want: isUnsafe, entries: []ent{
			symlink("root", "/"), file("root/outside/evil", "x")}},
		{name: "symlink to absolute outside then write", want: isUnsafe, entries: []ent{
			symlink("abs", "/tmp"), file("abs/evil", "x")}},
		{name: "symlink to absolute sentinel dir then write", want: isUnsafe, abs: func(s sandbox) []ent {
			return []ent{symlink("abs", s.outside), file("abs/evil", "x"), file("abs/victim", "pwned")}
		}},
		{name: "hardlink to absolute sentinel through symlink", want: isUnsafe, abs: func(s sandbox) []ent {
			return []ent{symlink("abs", s.outside), hardlink("h", "abs/victim")}
		}},
		{name: "symlink relative up then write", want: isUnsafe, entries: []ent{
			symlink("up", "../"), file("up/outside/evil", "x")}},
		{name: "symlink relative up overwrite sentinel", want: isUnsafe, entries: []ent{
			symlink("up", ".."), file("up/outside/victim", "pwned")}},
		{name: "symlink deep relative then write", want: isUnsafe, entries: []ent{
			dir("a/"), dir("a/b/"), symlink("a/b/up", "../../../outside"), file("a/b/up/evil", "x")}},
		{name: "symlink chain leading out", want: isUnsafe, entries: []ent{
			symlink("a", "b"), symlink("b", "c"), symlink("c", "../outside"), file("a/evil", "x")}},
		{name: "symlink chain staying inside", want: succeeds, entries: []ent{
			dir("d/"), symlink("a", "b"), symlink("b", "d"), file("a/x", "x")},
			check: wantFile("d/x", "x")},
		{name: "symlink loop", want: isUnsafe, entries: []ent{
			symlink("a", "b"), symlink("b", "a"), file("a/x", "x")}},
		{name: "magic link", want: isUnsafe, entries: []ent{
			symlink("p", "/proc/self/root"), file("p/tmp/evil", "x")}},
		{name: "magic link relative", want: isUnsafe, entries: []ent{
			symlink("p", "../../../../../../../../proc/self/cwd"), file("p/evil", "x")}},
		// RESOLVE_BENEATH refuses absolute symlinks as parents even when they
		// point back inside the layer: the layer must not depend on where it is
		// unpacked. See the package doc.
		{name: "absolute symlink pointing inside then write", want: isUnsafe, entries: []ent{
			dir("d/"), symlink("abs", "/d"), file("abs/x", "x")}},
		{name: "symlink then mkdir through it", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), dir("s/newdir/")}},
		{name: "symlink then symlink through it", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), symlink("s/evil", "/etc/shadow")}},
		{name: "symlink then fifo through it", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), fifo("s/evil")}},
		{name: "symlink then implied parent through it", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), file("s/new/deep/evil", "x")}},
		{name: "symlink to outside file, file replaces it", want: succeeds, entries: []ent{
			symlink("s", "../outside/victim"), file("s", "mine")},
			check: wantFile("s", "mine")},
		{name: "symlink to outside dir, dir replaces it", want: succeeds, entries: []ent{
			symlink("s", "../outside"), dir("s/"), file("s/x", "x")},
			check: wantFile("s/x", "x")},
		{name: "dir replaced by symlink then write under it", want: isUnsafe, entries: []ent{
			dir("d/"), file("d/x", "x"), symlink("d", "../outside"), file("d/victim", "pwned")}},
		{name: "dir replaced by symlink, cached parent not reused", want: isUnsafe, entries: []ent{
			dir("d/"), dir("d/e/"), file("d/e/x", "x"), symlink("d", "../outside"), file("d/dir/victim2", "pwned")}},
		{name: "dir with symlink out replaced by file", want: succeeds, entries: []ent{
			dir("d/"), symlink("d/s", "../../outside"), file("d", "now a file")},
			check: wantFile("d", "now a file")},

		{name: "hardlink to dotdot", want: isUnsafe, entries: []ent{hardlink("h", "../outside/victim")}},
		{name: "hardlink deep dotdot", want: isUnsafe, entries: []ent{hardlink("h", "a/../../../outside/victim")}},
		{name: "hardlink through symlinked dir leading out", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), hardlink("h", "s/victim")}},
		{name: "hardlink through absolute symlinked dir", want: isUnsafe, entries: []ent{
			symlink("s", "/"), hardlink("h", "s/etc/passwd")}},
		{name: "hardlink absolute target stays inside and is missing", want: rejected, entries: []ent{
			hardlink("h", "/outside/victim")}},
		{name: "hardlink new name through symlink", want: isUnsafe, entries: []ent{
			file("f", "f"), symlink("s", "../outside"), hardlink("s/h", "f")}},
		{name: "hardlink to symlink leading out links the symlink", want: succeeds, entries: []ent{
			symlink("s", "../outside/victim"), hardlink("h", "s")},
			check: wantSymlink("h", "../outside/victim")},
		{name: "hardlink to symlink then file over it", want: succeeds, entries: []ent{
			symlink("s", "../outside/victim"), hardlink("h", "s"), file("h", "mine")},
			check: wantFile("h", "mine")},
		{name: "hardlink missing target", want: rejected, entries: []ent{hardlink("h", "nothere")}},

		{name: "whiteout dotdot as parent", want: isUnsafe, entries: []ent{file(".wh.../x", "x")}},
		{name: "whiteout dot", want: isUnsafe, entries: []ent{file(".wh..", "")}},
		{name: "whiteout dotdot", want: isUnsafe, entries: []ent{file("a/.wh...", "")}},
		{name: "whiteout empty", want: isUnsafe, entries: []ent{file(".wh.", "")}},
		{name: "whiteout through symlink", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), file("s/.wh.victim", "")}},
		{name: "opaque through symlink", want: isUnsafe, entries: []ent{
			symlink("s", "../outside"), file("s/.wh..wh..opq", "")}},
		{name: "whiteout of symlink leading out removes the symlink only", want: succeeds, entries: []ent{
			symlink("s", "../outside"), file(".wh.s", "")},
			check: wantWhiteout("s")},
		{name: "whiteout of dir holding symlink out", want: succeeds, entries: []ent{
			dir("d/"), symlink("d/s", "../../outside"), symlink("d/t", "/"), file(".wh.d", "")},
			check: wantWhiteout("d")},
		{name: "whiteout prefixed parent", want: isUnsafe, entries: []ent{file(".wh.d/x", "x")}},
		{name: "aufs metadata skipped", want: succeeds, entries: []ent{
			dir(".wh..wh.plnk/"), file(".wh..wh.plnk/123.456", "x"), file(".wh..wh.aufs", ""), hardlink("h", ".wh..wh.plnk/123.456")},
			check: wantAbsent(".wh..wh.plnk", ".wh..wh.aufs", "h")},
		{name: "device nodes skipped", want: succeeds, entries: []ent{
			device("sda", tar.TypeBlock, 8, 0), device("mem", tar.TypeChar, 1, 1), hardlink("mem2", "mem")},
			check: wantAbsent("sda", "mem", "mem2")},
		{name: "overlay xattrs dropped", want: succeeds, entries: []ent{
			dir("d/").with(func(h *tar.Header) {
				h.PAXRecords = map[string]string{
					"SCHILY.xattr.trusted.overlay.redirect": "/../../outside",
					"SCHILY.xattr.trusted.overlay.opaque":   "y",
					"SCHILY.xattr.user.overlay.redirect":    "/x",
				}
			})},
			check: wantNoXattr("d", "trusted.overlay.redirect", "trusted.overlay.opaque", "user.overlay.redirect")},
		{name: "security and trusted xattrs dropped", want: succeeds, entries: []ent{
			file("f", "x").with(func(h *tar.Header) {
				h.PAXRecords = map[string]string{
					"SCHILY.xattr.security.selinux":         "system_u:object_r:container_runtime_exec_t:s0",
					"SCHILY.xattr.security.ima":             "\x03\x02",
					"SCHILY.xattr.trusted.overlay.metacopy": "",
					"SCHILY.xattr.trusted.x":                "y",
				}
			})},
			check: wantNoXattr("f", "security.selinux", "security.ima", "trusted.overlay.metacopy", "trusted.x")},
		{name: "unknown type", want: rejected, entries: []ent{{hdr: tar.Header{Typeflag: 'Z', Name: "z", ModTime: testTime}}}},
	}
}

func TestBreakouts(t *testing.T) {
	requireRoot(t)
	for _, tc := range breakouts() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newSandbox(t, t.TempDir())
			entries := tc.entries
			if tc.abs != nil {
				entries = append(entries, tc.abs(s)...)
			}
			before := snapshot(t, s.tmp, s.layer)
			_, err := Apply(context.Background(), s.layer, bytes.NewReader(makeTar(t, entries...)))
			if diffs := diffSnapshots(before, snapshot(t, s.tmp, s.layer)); len(diffs) > 0 {
				t.Errorf("Apply changed things outside the layer:\n%v", diffs)
			}
			var got outcome
			switch {
			case err == nil:
				got = succeeds
			case errors.Is(err, ErrUnsafe):
				got = isUnsafe
				var ue *UnsafeError
				if !errors.As(err, &ue) || ue.Entry == "" || ue.Reason == "" {
					t.Errorf("unsafe error %v is not an *UnsafeError naming the entry", err)
				}
			default:
				got = rejected
			}
			if got != tc.want {
				t.Fatalf("Apply: want %v, got %v (err: %v); layer:\n%s", tc.want, got, err, listTree(s.layer))
			}
			if err == nil {
				assertNoWhiteoutNames(t, s.layer)
				if tc.check != nil {
					tc.check(t, s.layer)
				}
			}
		})
	}
}

func TestUnsafeErrorMessage(t *testing.T) {
	requireRoot(t)
	_, _, err := applyTar(t, file("../etc/passwd", "x"))
	want := `unsafe layer: entry "../etc/passwd": path leaves the layer`
	if err == nil || err.Error() != want {
		t.Fatalf("want error %q, got %v", want, err)
	}
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("errors.Is(%v, ErrUnsafe) is false", err)
	}
}

func wantFile(name, content string) func(*testing.T, string) {
	return func(t *testing.T, layer string) {
		t.Helper()
		p := filepath.Join(layer, name)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			t.Fatalf("want regular file %s, got %v, %v", name, fi, err)
		}
		b, _ := os.ReadFile(p)
		if string(b) != content {
			t.Fatalf("%s: want content %q, got %q", name, content, b)
		}
	}
}

func wantSymlink(name, target string) func(*testing.T, string) {
	return func(t *testing.T, layer string) {
		t.Helper()
		got, err := os.Readlink(filepath.Join(layer, name))
		if err != nil || got != target {
			t.Fatalf("want symlink %s -> %s, got %q, %v", name, target, got, err)
		}
	}
}

func wantAbsent(names ...string) func(*testing.T, string) {
	return func(t *testing.T, layer string) {
		t.Helper()
		for _, n := range names {
			if _, err := os.Lstat(filepath.Join(layer, n)); !os.IsNotExist(err) {
				t.Errorf("want %s absent, Lstat says %v", n, err)
			}
		}
	}
}
