package unpack

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func lstat(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatalf("lstat: %v", err)
	}
	return &st
}

func getxattr(p, key string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Lgetxattr(p, key, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func wantWhiteout(name string) func(*testing.T, string) {
	return func(t *testing.T, layer string) {
		t.Helper()
		st := lstat(t, filepath.Join(layer, name))
		if st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Rdev != 0 {
			t.Fatalf("%s: want char device 0/0 (a whiteout), got mode %o rdev %d", name, st.Mode, st.Rdev)
		}
		if st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: whiteout owned by %d:%d, want 0:0", name, st.Uid, st.Gid)
		}
	}
}

func wantNoXattr(name string, keys ...string) func(*testing.T, string) {
	return func(t *testing.T, layer string) {
		t.Helper()
		for _, k := range keys {
			if v, err := getxattr(filepath.Join(layer, name), k); !errors.Is(err, unix.ENODATA) {
				t.Errorf("%s: want no xattr %s, got %q, %v", name, k, v, err)
			}
		}
	}
}

// assertNoWhiteoutNames fails if any name in the layer starts with ".wh.".
func assertNoWhiteoutNames(t testing.TB, layer string) {
	t.Helper()
	filepath.WalkDir(layer, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), whiteoutPrefix) {
			t.Errorf("whiteout name left in the layer: %s", p)
		}
		return nil
	})
}

func mustApply(t *testing.T, entries ...ent) (string, Stats) {
	t.Helper()
	s, st, err := applyTar(t, entries...)
	if err != nil {
		t.Fatalf("Apply: %v\nlayer:\n%s", err, listTree(s.layer))
	}
	assertNoWhiteoutNames(t, s.layer)
	return s.layer, st
}

func TestWhiteouts(t *testing.T) {
	requireRoot(t)
	layer, st := mustApply(t,
		dir("a/"),
		file("a/.wh.gone", ""),
		file("a/present", "p"),
		file("a/.wh.present", ""), // a whiteout replaces an earlier entry of the layer
		file("implied/.wh.x", ""), // parent created as tar does
		device("dev00", tar.TypeChar, 0, 0),
		dir("wdir/"), file("wdir/f", "f"), file(".wh.wdir", ""),
	)
	for _, n := range []string{"a/gone", "a/present", "implied/x", "dev00", "wdir"} {
		wantWhiteout(n)(t, layer)
	}
	if st.Whiteouts != 5 {
		t.Errorf("Stats.Whiteouts: want 5, got %d", st.Whiteouts)
	}
	if m := lstat(t, filepath.Join(layer, "a/gone")).Mode & 0o7777; m != 0 {
		t.Errorf("whiteout permissions: want 0000, got %04o", m)
	}
}

func TestOpaque(t *testing.T) {
	requireRoot(t)
	layer, st := mustApply(t,
		dir("a/"), file("a/.wh..wh..opq", ""), file("a/new", "n"),
		file("b/c/.wh..wh..opq", ""), // directory implied
	)
	for _, d := range []string{"a", "b/c"} {
		v, err := getxattr(filepath.Join(layer, d), "trusted.overlay.opaque")
		if err != nil || v != "y" {
			t.Errorf("%s: want trusted.overlay.opaque=y, got %q, %v", d, v, err)
		}
	}
	if st.Opaques != 2 {
		t.Errorf("Stats.Opaques: want 2, got %d", st.Opaques)
	}
	wantFile("a/new", "n")(t, layer)
}

func TestModesAndOwners(t *testing.T) {
	requireRoot(t)
	owned := func(uid, gid int, mode int64) func(*tar.Header) {
		return func(h *tar.Header) { h.Uid, h.Gid, h.Mode = uid, gid, mode }
	}
	layer, _ := mustApply(t,
		dir("sticky/").with(owned(0, 0, 0o1777)),
		dir("sgid/").with(owned(1000, 50, 0o2775)),
		file("sgid/inherits-not", "x").with(owned(7, 8, 0o640)),
		file("suid", "x").with(owned(1234, 5678, 0o4755)),
		file("sgidfile", "x").with(owned(1234, 5678, 0o2711)),
		file("noperm", "x").with(owned(0, 0, 0)),
		dir("closed/").with(owned(3, 4, 0o500)),
		file("closed/inside", "x").with(owned(3, 4, 0o400)),
		symlink("link", "suid").with(owned(99, 98, 0o777)),
		fifo("fifo").with(owned(5, 6, 0o620)),
	)
	for _, c := range []struct {
		name     string
		typ      uint32
		uid, gid uint32
		mode     uint32
	}{
		{"sticky", syscall.S_IFDIR, 0, 0, 0o1777},
		{"sgid", syscall.S_IFDIR, 1000, 50, 0o2775},
		{"sgid/inherits-not", syscall.S_IFREG, 7, 8, 0o640},
		{"suid", syscall.S_IFREG, 1234, 5678, 0o4755},
		{"sgidfile", syscall.S_IFREG, 1234, 5678, 0o2711},
		{"noperm", syscall.S_IFREG, 0, 0, 0},
		{"closed", syscall.S_IFDIR, 3, 4, 0o500},
		{"closed/inside", syscall.S_IFREG, 3, 4, 0o400},
		{"link", syscall.S_IFLNK, 99, 98, 0o777},
		{"fifo", syscall.S_IFIFO, 5, 6, 0o620},
	} {
		st := lstat(t, filepath.Join(layer, c.name))
		if st.Mode&syscall.S_IFMT != c.typ || (c.typ != syscall.S_IFLNK && st.Mode&0o7777 != c.mode) || st.Uid != c.uid || st.Gid != c.gid {
			t.Errorf("%s: want type %o mode %04o owner %d:%d, got type %o mode %04o owner %d:%d",
				c.name, c.typ, c.mode, c.uid, c.gid, st.Mode&syscall.S_IFMT, st.Mode&0o7777, st.Uid, st.Gid)
		}
	}
}

func TestImpliedParents(t *testing.T) {
	requireRoot(t)
	layer, _ := mustApply(t, file("a/b/c", "c"))
	for _, d := range []string{"a", "a/b"} {
		st := lstat(t, filepath.Join(layer, d))
		if st.Mode != syscall.S_IFDIR|0o755 || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: want directory 0755 0:0, got mode %o owner %d:%d", d, st.Mode, st.Uid, st.Gid)
		}
	}
}

func TestTimes(t *testing.T) {
	requireRoot(t)
	mtime := time.Date(2001, 2, 3, 4, 5, 6, 789, time.UTC)
	atime := time.Date(2011, 1, 1, 0, 0, 0, 5, time.UTC)
	dirTime := time.Date(1999, 12, 31, 23, 59, 59, 0, time.UTC)
	withTimes := func(m, a time.Time) func(*tar.Header) {
		return func(h *tar.Header) { h.ModTime, h.AccessTime = m, a }
	}
	// Not mustApply: walking the tree would update the directories' atimes.
	s, _, err := applyTar(t,
		dir("./").with(withTimes(dirTime, time.Time{})),
		dir("d/").with(withTimes(dirTime, time.Time{})),
		dir("d/sub/").with(withTimes(dirTime, time.Time{})),
		file("d/f", "x").with(withTimes(mtime, atime)),
		file("d/sub/g", "x").with(withTimes(mtime, time.Time{})),
		symlink("d/l", "f").with(withTimes(mtime, atime)),
		fifo("d/p").with(withTimes(mtime, atime)),
		file("d/.wh.gone", ""), // changes d after all its metadata entries
	)
	if err != nil {
		t.Fatal(err)
	}
	layer := s.layer
	for _, c := range []struct {
		name         string
		mtime, atime time.Time
	}{
		{".", dirTime, dirTime},
		{"d", dirTime, dirTime},
		{"d/sub", dirTime, dirTime},
		{"d/f", mtime, atime},
		{"d/sub/g", mtime, mtime},
		{"d/l", mtime, atime},
		{"d/p", mtime, atime},
	} {
		st := lstat(t, filepath.Join(layer, c.name))
		gotM := time.Unix(st.Mtim.Unix())
		gotA := time.Unix(st.Atim.Unix())
		if !gotM.Equal(c.mtime) || !gotA.Equal(c.atime) {
			t.Errorf("%s: want mtime %v atime %v, got %v %v", c.name, c.mtime, c.atime, gotM, gotA)
		}
	}
}

func TestSymlinksAndHardlinks(t *testing.T) {
	requireRoot(t)
	layer, st := mustApply(t,
		file("f", "content"),
		symlink("rel", "f"),
		symlink("abs", "/usr/bin/env"),
		symlink("dangling", "../../nowhere"),
		hardlink("h1", "f"),
		hardlink("/d/h2", "/f"), // absolute names and targets are stripped
		hardlink("hl", "rel"),   // a hardlink to a symlink links the symlink
		hardlink("self", "self"),
	)
	for name, target := range map[string]string{"rel": "f", "abs": "/usr/bin/env", "dangling": "../../nowhere", "hl": "f"} {
		wantSymlink(name, target)(t, layer)
	}
	f := lstat(t, filepath.Join(layer, "f"))
	for _, h := range []string{"h1", "d/h2"} {
		if hs := lstat(t, filepath.Join(layer, h)); hs.Ino != f.Ino {
			t.Errorf("%s: want the inode of f (%d), got %d", h, f.Ino, hs.Ino)
		}
	}
	if f.Nlink != 3 {
		t.Errorf("f: want 3 links, got %d", f.Nlink)
	}
	if rel, hl := lstat(t, filepath.Join(layer, "rel")), lstat(t, filepath.Join(layer, "hl")); rel.Ino != hl.Ino {
		t.Errorf("hl: want the symlink's inode %d, got %d", rel.Ino, hl.Ino)
	}
	if st.Files != 1 {
		t.Errorf("Stats.Files: want 1, got %d", st.Files)
	}
}

func TestXattrs(t *testing.T) {
	requireRoot(t)
	pax := func(kv ...string) func(*tar.Header) {
		return func(h *tar.Header) {
			h.PAXRecords = map[string]string{}
			for i := 0; i < len(kv); i += 2 {
				h.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
			}
		}
	}
	layer, _ := mustApply(t,
		file("f", "x").with(pax("user.mime", "text/plain", "trusted.t", "tv", "trusted.overlay.metacopy", "",
			"security.capability", "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")),
		dir("d/").with(pax("user.d", "dv", "trusted.overlay.opaque", "y")),
		symlink("l", "f").with(pax("trusted.l", "lv", "user.l", "dropped", "trusted.overlay.redirect", "/x")),
	)
	for _, c := range []struct{ name, key, want string }{
		{"f", "user.mime", "text/plain"},
		{"d", "user.d", "dv"},
	} {
		if got, err := getxattr(filepath.Join(layer, c.name), c.key); err != nil || got != c.want {
			t.Errorf("%s: want xattr %s=%q, got %q, %v", c.name, c.key, c.want, got, err)
		}
	}
	if got, err := getxattr(filepath.Join(layer, "f"), "security.capability"); err != nil || len(got) != 20 {
		t.Errorf("f: want security.capability (set after chown, which clears it), got %q, %v", got, err)
	}
	wantNoXattr("f", "trusted.overlay.metacopy")(t, layer)
	wantNoXattr("d", "trusted.overlay.opaque")(t, layer)
	wantNoXattr("l", "trusted.overlay.redirect", "user.l", "trusted.l")(t, layer)
	// trusted.* other than overlay's is not kept either (KeepXattr).
	wantNoXattr("f", "trusted.t")(t, layer)
}

func TestSparseFile(t *testing.T) {
	requireRoot(t)
	const size = 64 << 20
	content := make([]byte, size)
	copy(content[0:], "head")
	copy(content[size/2+123:], "middle, not block aligned")
	copy(content[size-5000:], "near the end, then a hole")
	endsInHole := make([]byte, 10<<20)
	copy(endsInHole, "start")
	layer, st := mustApply(t, file("disk.img", string(content)), file("tail", string(endsInHole)), file("empty", ""))
	for name, want := range map[string][]byte{"disk.img": content, "tail": endsInHole, "empty": nil} {
		p := filepath.Join(layer, name)
		got, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: content differs (len want %d got %d, err %v)", name, len(want), len(got), err)
		}
		if s := lstat(t, p); s.Blocks*512 > 64<<10 {
			t.Errorf("%s: %d bytes allocated for %d bytes of mostly zeros; want a sparse file", name, s.Blocks*512, s.Size)
		}
	}
	if want := int64(size + 10<<20); st.Bytes != want {
		t.Errorf("Stats.Bytes: want %d, got %d", want, st.Bytes)
	}
}

func TestReplace(t *testing.T) {
	requireRoot(t)
	layer, _ := mustApply(t,
		file("f", "old"), file("f", "new"),
		file("fd", "file"), dir("fd/"), file("fd/x", "x"),
		dir("df/"), file("df/x", "x"), dir("df/sub/"), file("df/sub/y", "y"), file("df", "now a file"),
		dir("merge/"), file("merge/a", "a"), dir("merge/").with(func(h *tar.Header) { h.Mode = 0o700 }), file("merge/b", "b"),
		symlink("sf", "f"), file("sf", "replaced link"),
		file("ls", "x"), symlink("ls", "f"),
		file("lf", "x"), hardlink("lf", "f"),
	)
	wantFile("f", "new")(t, layer)
	wantFile("fd/x", "x")(t, layer)
	wantFile("df", "now a file")(t, layer)
	wantFile("merge/a", "a")(t, layer)
	wantFile("merge/b", "b")(t, layer)
	wantFile("sf", "replaced link")(t, layer)
	wantSymlink("ls", "f")(t, layer)
	wantFile("lf", "new")(t, layer)
	if m := lstat(t, filepath.Join(layer, "merge")).Mode & 0o7777; m != 0o700 {
		t.Errorf("merge: the later directory entry's mode 0700 should apply, got %04o", m)
	}
}

func TestDevicesSkippedFifoCreated(t *testing.T) {
	requireRoot(t)
	layer, st := mustApply(t,
		device("dev/sda", tar.TypeBlock, 8, 0),
		device("dev/null", tar.TypeChar, 1, 3),
		fifo("dev/fifo"),
	)
	wantAbsent("dev/sda", "dev/null")(t, layer)
	if s := lstat(t, filepath.Join(layer, "dev/fifo")); s.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		t.Errorf("dev/fifo: want a FIFO, got mode %o", s.Mode)
	}
	if st.Skipped != 2 || st.Entries != 3 {
		t.Errorf("Stats: want 3 entries, 2 skipped, got %+v", st)
	}
}

func TestStats(t *testing.T) {
	requireRoot(t)
	_, st := mustApply(t,
		dir("a/"), file("a/f", "12345"), file("a/g", "678"), file("a/.wh.x", ""), file("a/.wh..wh..opq", ""),
		file(".wh..wh.plnk", ""), symlink("l", "a"), hardlink("h", "a/f"), device("sda", tar.TypeBlock, 8, 0),
	)
	want := Stats{Entries: 9, Files: 2, Bytes: 8, Whiteouts: 1, Opaques: 1, Skipped: 2}
	st.peakDirTimes, st.lookups = 0, 0 // internal, see TestDirTimesBounded, TestDeepPathsLinear
	if st != want {
		t.Errorf("Stats: want %+v, got %+v", want, st)
	}
}

func TestCancel(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s := newSandbox(t, t.TempDir())
	_, err := Apply(ctx, s.layer, bytes.NewReader(makeTar(t, file("f", "x"))))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %v", err)
	}
}

func TestTargetMustBeEmpty(t *testing.T) {
	requireRoot(t)
	s := newSandbox(t, t.TempDir())
	must(t, os.WriteFile(filepath.Join(s.layer, "leftover"), nil, 0o644))
	if _, err := Apply(context.Background(), s.layer, bytes.NewReader(makeTar(t, file("f", "x")))); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("want a not-empty error, got %v", err)
	}
	if _, err := Apply(context.Background(), filepath.Join(s.tmp, "missing"), bytes.NewReader(nil)); err == nil {
		t.Fatal("want an error for a missing target dir")
	}
}

func TestCorruptTar(t *testing.T) {
	requireRoot(t)
	data := makeTar(t, file("f", strings.Repeat("x", 10000)))
	s := newSandbox(t, t.TempDir())
	if _, err := Apply(context.Background(), s.layer, bytes.NewReader(data[:3000])); err == nil {
		t.Fatal("want an error for a truncated tar")
	}
	s = newSandbox(t, t.TempDir())
	bad := bytes.Clone(data)
	bad[100] ^= 0xff // header checksum no longer matches
	if _, err := Apply(context.Background(), s.layer, bytes.NewReader(bad)); err == nil {
		t.Fatal("want an error for a corrupt header")
	}
}

func TestManyDirsBoundedCache(t *testing.T) {
	requireRoot(t)
	var entries []ent
	for i := range 2000 {
		d := filepath.Join("d", string(rune('a'+i%26)), strings.Repeat("x", i%7), "n"+string(rune('0'+i%10)), "k"+itoa(i))
		entries = append(entries, file(d+"/f", "x"))
	}
	layer, st := mustApply(t, entries...)
	if st.Files != 2000 {
		t.Fatalf("want 2000 files, got %d", st.Files)
	}
	wantFile(filepath.Join("d", "b", "x", "n1", "k1", "f"), "x")(t, layer)
	// Every fd is closed on return.
	fds, _ := os.ReadDir("/proc/self/fd")
	if len(fds) > 64 {
		t.Errorf("%d fds open after Apply; leak?", len(fds))
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
