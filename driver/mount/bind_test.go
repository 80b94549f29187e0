package mount

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestBind(t *testing.T) {
	requireRoot(t)
	for _, ro := range []bool{false, true} {
		d := t.TempDir()
		src, target := mkdir(t, d+"/src"), mkdir(t, d+"/target")
		writeFile(t, src+"/f", "src")
		if err := Bind(src, target, ro); err != nil {
			t.Fatal(err)
		}
		cleanupUnmount(t, target)
		// Same filesystem: only a mount-id comparison sees this.
		assertMountPoint(t, target, true)
		assertContent(t, target+"/f", "src")
		assertFlags(t, target, ro)
		if ro {
			assertEROFS(t, target+"/f")
		} else {
			writeFile(t, target+"/g", "via bind")
			assertContent(t, src+"/g", "via bind")
		}
		// The source mount is left alone.
		var st unix.Statfs_t
		if err := unix.Statfs(src, &st); err != nil || st.Flags&unix.ST_RDONLY != 0 {
			t.Errorf("source became read-only: flags %#x err %v", st.Flags, err)
		}
	}
}

func TestBindErrors(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	target := mkdir(t, d+"/target")
	writeFile(t, d+"/file", "x")
	err := Bind(d+"/file", target, true)
	if !errors.Is(err, ErrNotDir) || !strings.Contains(err.Error(), d+"/file") {
		t.Errorf("Bind(file) = %v, want ErrNotDir naming the path", err)
	}
	err = Bind(d+"/missing", target, true)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), d+"/missing") {
		t.Errorf("Bind(missing) = %v, want fs.ErrNotExist naming the path", err)
	}
	err = Bind(d, d+"/no-target", true)
	if err == nil {
		t.Error("Bind to a missing target succeeded")
	}
	assertMountPoint(t, target, false)
}

// imageRoot builds an untrusted-looking tree:
//
//	root/marker
//	root/sub/dir/f
//	root/sub/file
//	root/abs-etc  -> /etc
//	root/rel-etc  -> ../../../../../../../../etc
//	root/proc-escape -> /proc/self/root
func imageRoot(t *testing.T, withEtc bool) string {
	t.Helper()
	root := mkdir(t, t.TempDir()+"/root")
	writeFile(t, root+"/marker", "image root")
	writeFile(t, root+"/sub/dir/f", "sub-dir-f")
	writeFile(t, root+"/sub/file", "a file")
	if withEtc {
		writeFile(t, root+"/etc/image-etc", "image etc")
	}
	for name, dest := range map[string]string{
		"abs-etc":     "/etc",
		"rel-etc":     "../../../../../../../../etc",
		"proc-escape": "/proc/self/root",
		"dangling":    "/nowhere",
	} {
		if err := os.Symlink(dest, root+"/"+name); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func bindBeneathT(t *testing.T, root, sub string, ro bool) string {
	t.Helper()
	target := mkdir(t, t.TempDir()+"/target")
	if err := BindBeneath(root, sub, target, ro, Options{}); err != nil {
		t.Fatalf("BindBeneath(%s, %q): %v", root, sub, err)
	}
	cleanupUnmount(t, target)
	assertMountPoint(t, target, true)
	return target
}

// assertNotHostEtc: the host's /etc has os-release/passwd, the image's not.
func assertNotHostEtc(t *testing.T, target string) {
	t.Helper()
	for _, f := range []string{"passwd", "os-release", "hostname"} {
		if _, err := os.Lstat(target + "/" + f); err == nil {
			t.Errorf("%s/%s exists: the bind escaped to the host /etc", target, f)
		}
	}
}

func TestBindBeneath(t *testing.T) {
	requireRoot(t)
	root := imageRoot(t, true)

	t.Run("subdir", func(t *testing.T) {
		target := bindBeneathT(t, root, "sub/dir", true)
		assertContent(t, target+"/f", "sub-dir-f")
		assertEROFS(t, target+"/f")
		assertFlags(t, target, true)
	})
	t.Run("absolute sub is relative to root", func(t *testing.T) {
		target := bindBeneathT(t, root, "/sub/dir", false)
		assertContent(t, target+"/f", "sub-dir-f")
		assertFlags(t, target, false)
		writeFile(t, target+"/w", "written")
		assertContent(t, root+"/sub/dir/w", "written")
	})
	t.Run("empty sub is root", func(t *testing.T) {
		target := bindBeneathT(t, root, "", true)
		assertContent(t, target+"/marker", "image root")
	})
	for _, sub := range []string{"abs-etc", "rel-etc", "/etc", "../../etc", "sub/../../../etc"} {
		t.Run("symlink or dotdot stays inside/"+sub, func(t *testing.T) {
			target := bindBeneathT(t, root, sub, true)
			assertContent(t, target+"/image-etc", "image etc")
			assertNotHostEtc(t, target)
		})
	}
	for _, sub := range []string{"..", "../..", "/..", "sub/../../.."} {
		t.Run("dotdot is root/"+sub, func(t *testing.T) {
			target := bindBeneathT(t, root, sub, true)
			assertContent(t, target+"/marker", "image root")
		})
	}
}

func TestBindBeneathErrors(t *testing.T) {
	requireRoot(t)
	root := imageRoot(t, false)
	target := mkdir(t, t.TempDir()+"/target")
	check := func(sub string, want error) {
		t.Helper()
		err := BindBeneath(root, sub, target, true, Options{})
		if err == nil {
			cleanupUnmount(t, target)
			t.Fatalf("BindBeneath(%q) succeeded, want %v", sub, want)
		}
		if !errors.Is(err, want) {
			t.Errorf("BindBeneath(%q) = %v, want %v", sub, err, want)
		}
		if !strings.Contains(err.Error(), sub) {
			t.Errorf("BindBeneath(%q) = %v: sub not named", sub, err)
		}
		assertMountPoint(t, target, false)
	}
	// Without root/etc, a link to /etc must fail, never land on the host's.
	check("abs-etc", fs.ErrNotExist)
	check("rel-etc", fs.ErrNotExist)
	check("../../../etc", fs.ErrNotExist)
	check("dangling", fs.ErrNotExist)
	check("missing", fs.ErrNotExist)
	check("sub/missing/deeper", fs.ErrNotExist)
	check("sub/file", ErrNotDir)
	check("marker", ErrNotDir)
	// /proc/self/root inside the image does not exist; a magic link would
	// not be followed anyway.
	check("proc-escape", fs.ErrNotExist)

	if err := BindBeneath(root+"/missing-root", "sub", target, true, Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing root: %v", err)
	}
}

// TestBindBeneathNoMagicLinks: with a real /proc inside the root, a
// /proc/self/root link (a magic link to the host's /) is refused.
func TestBindBeneathNoMagicLinks(t *testing.T) {
	requireRoot(t)
	root := imageRoot(t, false)
	proc := mkdir(t, root+"/proc")
	if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, proc)
	target := mkdir(t, t.TempDir()+"/target")
	for _, sub := range []string{"proc-escape", "proc/self/root", "proc/self/cwd"} {
		err := BindBeneath(root, sub, target, true, Options{})
		if err == nil {
			cleanupUnmount(t, target)
			t.Fatalf("BindBeneath(%q) followed a magic link", sub)
		}
		if !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.EXDEV) {
			t.Logf("BindBeneath(%q): %v", sub, err)
		}
	}
	assertMountPoint(t, target, false)
}
