package mount

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestUnmount(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	src, target := mkdir(t, d+"/src"), mkdir(t, d+"/target")
	writeFile(t, src+"/f", "x")

	if err := Unmount(target); err != nil {
		t.Errorf("Unmount(not mounted) = %v", err)
	}
	if err := Unmount(d + "/missing"); err != nil {
		t.Errorf("Unmount(missing) = %v", err)
	}
	if err := Unmount(d + "/missing/deeper"); err != nil {
		t.Errorf("Unmount(missing/deeper) = %v", err)
	}

	if err := Bind(src, target, true); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	// A busy mount reports EBUSY and stays (no lazy detach).
	f, err := os.Open(target + "/f")
	if err != nil {
		t.Fatal(err)
	}
	if err := Unmount(target); !errors.Is(err, unix.EBUSY) {
		t.Errorf("Unmount(busy) = %v, want EBUSY", err)
	}
	assertMountPoint(t, target, true)
	f.Close()
	if err := Unmount(target); err != nil {
		t.Fatal(err)
	}
	assertMountPoint(t, target, false)
	if err := Unmount(target); err != nil {
		t.Errorf("second Unmount = %v", err)
	}

	// A symlink to a mount point is not followed.
	if err := Bind(src, target, true); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, d+"/link"); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(d + "/link"); err != nil {
		t.Errorf("Unmount(symlink) = %v", err)
	}
	assertMountPoint(t, target, true)
}

func TestIsMountPoint(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	src, target := mkdir(t, d+"/src"), mkdir(t, d+"/target")
	assertMountPoint(t, d, false)
	assertMountPoint(t, target, false)
	assertMountPoint(t, "/", true)
	assertMountPoint(t, "/proc", true)
	if _, err := IsMountPoint(d + "/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("IsMountPoint(missing): %v, want fs.ErrNotExist", err)
	}

	// A bind of a dir of the same filesystem: same st_dev, other mount.
	if err := Bind(src, target, false); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	assertMountPoint(t, target, true)
	assertMountPoint(t, target+"/", true)
	assertMountPoint(t, src, false)

	// The fallback for kernels without STATX_ATTR_MOUNT_ROOT.
	for path, want := range map[string]bool{target: true, src: false, d: false, "/": true, "/proc": true} {
		var st unix.Statx_t
		if err := unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &st); err != nil {
			t.Fatal(err)
		}
		got, err := isMountPointByParent(path, &st)
		if err != nil || got != want {
			t.Errorf("isMountPointByParent(%s) = %v, %v; want %v", path, got, err, want)
		}
	}
}

func TestMountsUnder(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	src := mkdir(t, d+"/src")
	mkdir(t, src+"/with space")
	a, ab := mkdir(t, d+"/a"), mkdir(t, d+"/ab")
	spaced := a + "/with space" // seen through the bind at a
	for _, target := range []string{a, spaced, ab} {
		if err := Bind(src, target, true); err != nil {
			t.Fatal(err)
		}
		cleanupUnmount(t, target)
	}

	infos, err := MountsUnder(a + "/")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range infos {
		got = append(got, m.MountPoint)
	}
	// ab is not under a; the space comes back unescaped.
	if len(got) != 2 || got[0] != a || got[1] != spaced {
		t.Errorf("MountsUnder(%s) = %q, want [%q %q]", a, got, a, spaced)
	}
	all, err := MountsUnder(d)
	if err != nil || len(all) != 3 {
		t.Errorf("MountsUnder(%s) = %d entries, %v; want 3", d, len(all), err)
	}
	if none, err := MountsUnder(src); err != nil || len(none) != 0 {
		t.Errorf("MountsUnder(%s) = %v, %v; want none", src, none, err)
	}
	if root, err := MountsUnder("/"); err != nil || len(root) < 4 {
		t.Errorf("MountsUnder(/) = %d entries, %v", len(root), err)
	}
}

// openFds counts this process's open fds.
func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestNoFdLeak runs every operation, successful and failing, on every API,
// and checks that no fd is left open.
func TestNoFdLeak(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	l1, l2, upper, work, target := mkdir(t, d+"/l1"), mkdir(t, d+"/l2"), mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
	many := make([]string, 300)
	for i := range many {
		many[i] = mkdir(t, fmt.Sprintf("%s/many/%d", d, i))
	}
	currentAPI() // the probe's fds are not a leak
	before := openFds(t)
	for _, api := range allAPIs {
		forcedAPI.Store(int32(api))
		for _, o := range []Overlay{
			{Lowers: []string{l1, l2}, Upper: upper, Work: work},
			{Lowers: []string{l1, l2}},
			{Lowers: []string{l1}},
			{Lowers: many},
		} {
			if err := MountOverlay(o, target); err != nil && !(api == apiClassic && len(o.Lowers) == 300) {
				t.Fatalf("%v: %v", api, err)
			}
			if err := Unmount(target); err != nil {
				t.Fatal(err)
			}
		}
		_ = MountOverlay(Overlay{Lowers: []string{l1, d + "/missing"}}, target)
		_ = MountOverlay(Overlay{Lowers: []string{l1, l2}, Upper: upper, Work: d + "/missing"}, target)
	}
	forcedAPI.Store(0)
	if err := BindBeneath(d, "l1", target, true, Options{}); err != nil {
		t.Fatal(err)
	}
	_ = BindBeneath(d, "missing", target, true, Options{})
	_ = Bind(d+"/missing", target, true)
	if err := Unmount(target); err != nil {
		t.Fatal(err)
	}
	_, _ = IsMountPoint(target)
	_, _ = MountsUnder(d)
	if after := openFds(t); after != before {
		t.Errorf("open fds: %d before, %d after", before, after)
	}
}
