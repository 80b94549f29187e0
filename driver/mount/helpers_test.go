package mount

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// requireRoot fails (never skips) the test when not root: these tests make
// real mounts, and a silently skipped mount test is a test that never ran.
func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("mount tests need root (real mounts); run as root")
	}
}

// forceAPI makes MountOverlay use api for the rest of the test.
func forceAPI(tb testing.TB, api overlayAPI) {
	tb.Helper()
	forcedAPI.Store(int32(api))
	tb.Cleanup(func() { forcedAPI.Store(0) })
}

// allAPIs are the overlay code paths; the kernel under test has all three.
var allAPIs = []overlayAPI{apiFd, apiString, apiClassic}

func writeFile(tb testing.TB, path, content string) {
	tb.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		tb.Fatal(err)
	}
}

func mkdir(tb testing.TB, path string) string {
	tb.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		tb.Fatal(err)
	}
	return path
}

func assertContent(tb testing.TB, path, want string) {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Errorf("read %s: %v", path, err)
		return
	}
	if string(b) != want {
		tb.Errorf("%s = %q, want %q", path, b, want)
	}
}

func assertMissing(tb testing.TB, path string) {
	tb.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		tb.Errorf("%s: want not-exist, got err=%v", path, err)
	}
}

// cleanupUnmount unmounts target at the end of the test, if still mounted.
func cleanupUnmount(tb testing.TB, target string) {
	tb.Helper()
	tb.Cleanup(func() {
		if err := Unmount(target); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
}

// mountOverlayT mounts o at target and unmounts it at the end of the test.
func mountOverlayT(tb testing.TB, o Overlay, target string) {
	tb.Helper()
	if err := MountOverlay(o, target); err != nil {
		tb.Fatalf("MountOverlay: %v", err)
	}
	cleanupUnmount(tb, target)
}

func assertMountPoint(tb testing.TB, target string, want bool) {
	tb.Helper()
	got, err := IsMountPoint(target)
	if err != nil {
		tb.Fatalf("IsMountPoint(%s): %v", target, err)
	}
	if got != want {
		tb.Errorf("IsMountPoint(%s) = %v, want %v", target, got, want)
	}
}

// assertFlags checks statfs mount flags of target.
func assertFlags(tb testing.TB, target string, readOnly bool) {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		tb.Fatal(err)
	}
	if st.Flags&unix.ST_NOSUID == 0 {
		tb.Errorf("%s: nosuid not set (flags %#x)", target, st.Flags)
	}
	if st.Flags&unix.ST_NODEV == 0 {
		tb.Errorf("%s: nodev not set (flags %#x)", target, st.Flags)
	}
	if got := st.Flags&unix.ST_RDONLY != 0; got != readOnly {
		tb.Errorf("%s: read-only = %v, want %v (flags %#x)", target, got, readOnly, st.Flags)
	}
	// And the same seen through mountinfo.
	infos, err := MountsUnder(target)
	if err != nil {
		tb.Fatal(err)
	}
	if len(infos) == 0 {
		tb.Fatalf("MountsUnder(%s): no entry", target)
	}
	top := infos[len(infos)-1]
	opts := "," + strings.Join(top.MountOptions, ",") + ","
	for _, o := range []string{"nosuid", "nodev"} {
		if !strings.Contains(opts, ","+o+",") {
			tb.Errorf("mountinfo options of %s: %s lacks %s", target, opts, o)
		}
	}
}

func assertEROFS(tb testing.TB, path string) {
	tb.Helper()
	err := os.WriteFile(path, []byte("x"), 0o644)
	if !errors.Is(err, unix.EROFS) {
		tb.Errorf("write %s: want EROFS, got %v", path, err)
	}
}

// whiteout makes the 0/0 character device overlayfs reads as "deleted".
func whiteout(tb testing.TB, path string) {
	tb.Helper()
	if err := unix.Mknod(path, unix.S_IFCHR, int(unix.Mkdev(0, 0))); err != nil {
		tb.Fatal(err)
	}
}

// opaque marks dir so that overlayfs hides everything below it.
func opaque(tb testing.TB, dir string) {
	tb.Helper()
	if err := unix.Setxattr(dir, "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		tb.Fatal(err)
	}
}
