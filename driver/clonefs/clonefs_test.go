package clonefs

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
)

// requireLoop fails the test unless it can make real loop mounts: root,
// /dev/loop-control and mkfs.ext4.
func requireLoop(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("clonefs tests need root: they attach loop devices and mount ext4")
	}
	if _, err := os.Stat(loopControl); err != nil {
		tb.Fatalf("clonefs tests need loop devices: %v (modprobe loop)", err)
	}
	if _, err := mkfsTool(); err != nil {
		tb.Fatal(err)
	}
}

// newDir returns a clone directory (not yet created) that is removed, and
// unmounted, at the end of the test.
func newDir(tb testing.TB) string {
	tb.Helper()
	requireLoop(tb)
	dir := filepath.Join(tb.TempDir(), "clone")
	tb.Cleanup(func() {
		if err := Remove(dir); err != nil {
			tb.Errorf("cleanup: %v", err)
		}
	})
	return dir
}

// loopsNaming counts the loop devices whose backing file is path, as sysfs
// names it.
func loopsNaming(tb testing.TB, path string) int {
	tb.Helper()
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // released meanwhile
		}
		if strings.TrimSpace(string(b)) == path {
			n++
		}
	}
	return n
}

// mountsAt counts the mounts whose mount point is exactly target.
func mountsAt(tb testing.TB, target string) int {
	tb.Helper()
	ms, err := mount.MountsUnder(target)
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, m := range ms {
		if m.MountPoint == target {
			n++
		}
	}
	return n
}

func statfs(tb testing.TB, path string) unix.Statfs_t {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		tb.Fatal(err)
	}
	return st
}

func createMount(tb testing.TB, dir string, size int64) string {
	tb.Helper()
	if err := Create(context.Background(), dir, size); err != nil {
		tb.Fatal(err)
	}
	mnt, err := Mount(context.Background(), dir)
	if err != nil {
		tb.Fatal(err)
	}
	if want := filepath.Join(dir, state.FSDir); mnt != want {
		tb.Fatalf("Mount returned %s, want %s", mnt, want)
	}
	return mnt
}

// fill writes to path in 1 MiB chunks until a write fails, and returns the
// bytes written and the error.
func fill(tb testing.TB, path string) (int64, error) {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xa5}, miB)
	var written int64
	for {
		n, err := f.Write(buf)
		written += int64(n)
		if err == nil {
			err = nil
			continue
		}
		return written, err
	}
}

// TestSizes checks that the space a writer sees is at least the requested
// size, for sizes from one byte to 100 GiB, and that the overhead stays small.
func TestSizes(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
	}{
		{"1 byte", 1},
		{"1 MiB", miB},
		{"1e9 bytes", 1_000_000_000},
		{"1 GiB", 1 << 30},
		{"100 GiB", 100 << 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newDir(t)
			mnt := createMount(t, dir, tc.size)
			img := filepath.Join(dir, state.ImageFile)
			fi, err := os.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			st := statfs(t, mnt)
			avail := int64(st.Bavail) * st.Bsize
			if avail < tc.size {
				t.Errorf("statfs Bavail*Bsize = %d after mount, want >= %d", avail, tc.size)
			}
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			sb, err := readSuperblock(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			// The sizing predicts f_bavail from the superblock; the kernel's
			// answer after mount must be the same.
			if pred := sb.availBlocks() * blockSize; pred != avail {
				t.Errorf("predicted Bavail*Bsize %d, kernel says %d", pred, avail)
			}
			want := (tc.size + miB - 1) / miB * miB
			overhead := float64(fi.Size()-want) / float64(want)
			t.Logf("size %d: image %d bytes (%.1f%% over %d), Bavail %d bytes (+%d), Bfree-Bavail %d, disk %d KiB",
				tc.size, fi.Size(), 100*overhead, want, avail, avail-want, int64(st.Bfree-st.Bavail)*st.Bsize, fileDisk(t, img)/1024)
			// inode tables 1.6%, journal 1.6%, kernel reserve 2% (capped),
			// plus a fixed part that dominates small sizes.
			if limit := want/16 + 24*miB; fi.Size()-want > limit {
				t.Errorf("image is %d bytes for %d wanted: overhead %d is more than %d", fi.Size(), want, fi.Size()-want, limit)
			}
		})
	}
}

func fileDisk(tb testing.TB, path string) int64 {
	tb.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		tb.Fatal(err)
	}
	return st.Blocks * 512
}

// TestENOSPC writes until the clone is full: the write fails with ENOSPC
// after at least the requested size, and the node's disk only holds what was
// written.
func TestENOSPC(t *testing.T) {
	const size = 64 * miB
	dir := newDir(t)
	mnt := createMount(t, dir, size)
	img := filepath.Join(dir, state.ImageFile)
	hostBefore := statfs(t, dir)
	diskBefore := fileDisk(t, img)

	written, err := fill(t, filepath.Join(mnt, "big"))
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write after %d bytes: %v, want ENOSPC", written, err)
	}
	// A second writer is refused too.
	if _, err := fill(t, filepath.Join(mnt, "more")); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write to a second file: %v, want ENOSPC", err)
	}
	unix.Sync()
	if written < size {
		t.Errorf("ENOSPC after %d bytes, want at least %d", written, size)
	}
	fi, _ := os.Stat(img)
	if written > fi.Size() {
		t.Errorf("wrote %d bytes into a %d byte image", written, fi.Size())
	}
	diskAfter := fileDisk(t, img)
	hostAfter := statfs(t, dir)
	grew := diskAfter - diskBefore
	hostDrop := (int64(hostBefore.Bavail) - int64(hostAfter.Bavail)) * hostBefore.Bsize
	t.Logf("wrote %d bytes (%.1f MiB) before ENOSPC; image on disk %d -> %d bytes (+%d), image size %d; host free space dropped by %d bytes",
		written, float64(written)/miB, diskBefore, diskAfter, grew, fi.Size(), hostDrop)
	// The image grows by the data plus the metadata and journal blocks the
	// writes touched (less what discard gave back of the blocks mkfs had
	// written): well under the image's 12 MiB of overhead.
	if grew < written-miB || grew > written+12*miB {
		t.Errorf("image on disk grew by %d bytes for %d written, want between %d and %d", grew, written, written-miB, written+12*miB)
	}
	if diskAfter > fi.Size() {
		t.Errorf("image occupies %d bytes on disk, more than its size %d", diskAfter, fi.Size())
	}
	// Other processes share the host disk: allow them 256 MiB of noise.
	if hostDrop > grew+256*miB {
		t.Errorf("host free space dropped by %d bytes, the image grew by %d", hostDrop, grew)
	}

	// Space freed inside the clone is usable again, and goes back to the
	// node's disk (the filesystem is mounted with discard, which punches
	// holes in the image). ext4 issues the discards once the journal has
	// committed the transaction that freed the blocks, and sync(2) may
	// return before they are done: wait for them a while.
	if err := os.Remove(filepath.Join(mnt, "big")); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	freed := int64(0)
	for deadline := start.Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		unix.Sync()
		if freed = diskAfter - fileDisk(t, img); freed >= written*9/10 || time.Now().After(deadline) {
			break
		}
	}
	if freed < written*9/10 {
		t.Errorf("deleting %d bytes in the clone gave back %d bytes of the node's disk in %v, want about all of them", written, freed, time.Since(start).Round(time.Millisecond))
	}
	if err := os.WriteFile(filepath.Join(mnt, "after"), make([]byte, miB), 0o644); err != nil {
		t.Fatalf("write after freeing space: %v", err)
	}
}

// TestIdempotent repeats every operation.
func TestIdempotent(t *testing.T) {
	ctx := context.Background()
	dir := newDir(t)
	img := filepath.Join(dir, state.ImageFile)
	target := filepath.Join(dir, state.FSDir)
	for i := 0; i < 2; i++ {
		if err := Create(ctx, dir, 32*miB); err != nil {
			t.Fatalf("Create #%d: %v", i+1, err)
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", fi.Mode().Perm())
	}
	// The same size in bytes that rounds to the same MiB is the same image.
	if err := Create(ctx, dir, 32*miB-100); err != nil {
		t.Errorf("Create with a size that rounds to the same MiB: %v", err)
	}
	err = Create(ctx, dir, 64*miB)
	if err == nil || !strings.Contains(err.Error(), "32 MiB") || !strings.Contains(err.Error(), strconv.Itoa(64*miB)) {
		t.Errorf("Create with another size: %v, want an error naming 32 MiB and %d", err, 64*miB)
	}

	for i := 0; i < 2; i++ {
		if _, err := Mount(ctx, dir); err != nil {
			t.Fatalf("Mount #%d: %v", i+1, err)
		}
	}
	if n := mountsAt(t, target); n != 1 {
		t.Errorf("%d mounts at %s after two Mounts, want 1", n, target)
	}
	if n := loopsNaming(t, img); n != 1 {
		t.Errorf("%d loop devices hold %s, want 1", n, img)
	}
	// Root dir of the clone filesystem: 0:0, 0755; nosuid,nodev.
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != 0 || st.Gid != 0 || st.Mode&0o7777 != 0o755 {
		t.Errorf("clone root %d:%d mode %o, want 0:0 mode 755", st.Uid, st.Gid, st.Mode&0o7777)
	}
	sfs := statfs(t, target)
	if sfs.Type != unix.EXT4_SUPER_MAGIC || sfs.Flags&unix.ST_NOSUID == 0 || sfs.Flags&unix.ST_NODEV == 0 {
		t.Errorf("clone filesystem type %#x flags %#x, want ext4 with nosuid,nodev", sfs.Type, sfs.Flags)
	}

	for i := 0; i < 2; i++ {
		if err := Unmount(dir); err != nil {
			t.Fatalf("Unmount #%d: %v", i+1, err)
		}
	}
	if n := mountsAt(t, target); n != 0 {
		t.Errorf("%d mounts at %s after Unmount, want 0", n, target)
	}
	if n := loopsNaming(t, img); n != 0 {
		t.Errorf("%d loop devices still hold %s after Unmount, want 0", n, img)
	}
	if _, err := Stat(dir); err == nil {
		t.Error("Stat of an unmounted clone succeeded, want an error")
	}
	if _, err := Mount(ctx, dir); err != nil { // Remove must unmount
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := Remove(dir); err != nil {
			t.Fatalf("Remove #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("dir after Remove: %v, want it gone", err)
	}
	if n := loopsNaming(t, img); n != 0 {
		t.Errorf("%d loop devices still hold %s after Remove, want 0", n, img)
	}
	if err := Unmount(dir); err != nil {
		t.Errorf("Unmount of a removed clone: %v", err)
	}
	if _, err := Mount(ctx, dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Mount of a removed clone: %v, want fs.ErrNotExist", err)
	}
}

// TestPersistence is what a node reboot does: unmount, mount again, and the
// data is still there.
func TestPersistence(t *testing.T) {
	dir := newDir(t)
	mnt := createMount(t, dir, 16*miB)
	want := []byte("written before the reboot\n")
	if err := os.MkdirAll(filepath.Join(mnt, "upper", "a"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "upper", "a", "file"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if n := loopsNaming(t, filepath.Join(dir, state.ImageFile)); n != 0 {
		t.Fatalf("%d loop devices hold the image after Unmount, want 0", n)
	}
	if _, err := os.Stat(filepath.Join(mnt, "upper")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("upper visible after Unmount: %v", err)
	}
	// Create again (as a restarted plugin would) keeps the data.
	mnt = createMount(t, dir, 16*miB)
	got, err := os.ReadFile(filepath.Join(mnt, "upper", "a", "file"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after remount: %q, %v; want %q", got, err, want)
	}
}

// TestCreateLeftoverTemp: a Create killed while formatting leaves a temp
// file; the next Create removes it and makes the image.
func TestCreateLeftoverTemp(t *testing.T) {
	dir := newDir(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(dir, tempPrefix+"123456")
	if err := os.WriteFile(left, []byte("half an ext4 filesystem"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(left, 1<<30); err != nil {
		t.Fatal(err)
	}
	mnt := createMount(t, dir, 8*miB)
	if _, err := os.Stat(left); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("leftover temp file: %v, want it removed", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != state.ImageFile+" "+state.FSDir {
		t.Errorf("clone dir holds %v, want [%s %s]", names, state.ImageFile, state.FSDir)
	}
	if err := os.WriteFile(filepath.Join(mnt, "x"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCreateRefusesForeignImage: an ext4 image that Create did not make is
// not taken for a clone.
func TestCreateRefusesForeignImage(t *testing.T) {
	dir := newDir(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, state.ImageFile)
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16*miB); err != nil {
		t.Fatal(err)
	}
	tool, _ := mkfsTool()
	if out, err := exec.Command(tool, "-q", "-F", "-L", "other", img).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	err := Create(context.Background(), dir, 8*miB)
	if err == nil || !strings.Contains(err.Error(), `label "other"`) || !strings.Contains(err.Error(), img) {
		t.Errorf("Create over a foreign image: %v, want an error naming it and its label", err)
	}
	if err := Create(context.Background(), dir, 0); err == nil {
		t.Error("Create with size 0 succeeded")
	}
}

// TestStat compares Stat with statfs of the mount and du of the image.
func TestStat(t *testing.T) {
	dir := newDir(t)
	mnt := createMount(t, dir, 128*miB)
	img := filepath.Join(dir, state.ImageFile)
	before, err := Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "data"), bytes.Repeat([]byte{1}, 20*miB), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if err := os.WriteFile(filepath.Join(mnt, "f"+strconv.Itoa(i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	unix.Sync()
	u, err := Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	sfs := statfs(t, mnt)
	bs := sfs.Bsize
	want := Usage{
		UsedBytes:      int64(sfs.Blocks-sfs.Bfree) * bs,
		AvailableBytes: int64(sfs.Bavail) * bs,
		TotalBytes:     int64(sfs.Blocks) * bs,
		UsedInodes:     int64(sfs.Files - sfs.Ffree),
		FreeInodes:     int64(sfs.Ffree),
		TotalInodes:    int64(sfs.Files),
		DiskBytes:      u.DiskBytes,
	}
	if u != want {
		t.Errorf("Stat = %+v, statfs says %+v", u, want)
	}
	out, err := exec.Command("du", "--block-size=1", img).Output()
	if err != nil {
		t.Fatal(err)
	}
	du, err := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if u.DiskBytes != du {
		t.Errorf("DiskBytes %d, du says %d", u.DiskBytes, du)
	}
	if d := u.UsedBytes - before.UsedBytes; d < 20*miB || d > 21*miB {
		t.Errorf("UsedBytes grew by %d for 20 MiB written", d)
	}
	if d := u.UsedInodes - before.UsedInodes; d != 101 {
		t.Errorf("UsedInodes grew by %d for 101 files", d)
	}
	if u.DiskBytes < 20*miB || u.DiskBytes > 20*miB+8*miB {
		t.Errorf("DiskBytes %d for 20 MiB written", u.DiskBytes)
	}
	t.Logf("%+v", u)
}

// TestMountReusesAttachedDevice: when the image is still on a loop device
// (mounted somewhere else), Mount mounts that device rather than attaching a
// second one: two ext4 instances on one image would corrupt it.
func TestMountReusesAttachedDevice(t *testing.T) {
	dir := newDir(t)
	img := filepath.Join(dir, state.ImageFile)
	mnt := createMount(t, dir, 8*miB)
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, mnt, 0, 0, &st); err != nil {
		t.Fatal(err)
	}
	name, err := loopName(st.Dev_major, st.Dev_minor)
	if err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if err := unix.Mount("/dev/"+name, other, "ext4", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(other, 0)
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if n := loopsNaming(t, img); n != 1 {
		t.Fatalf("%d loop devices hold the image while mounted elsewhere, want 1", n)
	}
	if _, err := Mount(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if n := loopsNaming(t, img); n != 1 {
		t.Errorf("%d loop devices hold the image after Mount, want 1 (the existing one)", n)
	}
	if err := os.WriteFile(filepath.Join(mnt, "seen"), []byte("y"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(other, "seen")); err != nil {
		t.Errorf("the two mounts are not the same filesystem: %v", err)
	}
	if err := unix.Unmount(other, 0); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if n := loopsNaming(t, img); n != 0 {
		t.Errorf("%d loop devices hold the image after the last unmount, want 0", n)
	}
}

// TestMountSetFD exercises the path for kernels before 5.8: LOOP_SET_FD and
// LOOP_SET_STATUS64, which must set autoclear too.
func TestMountSetFD(t *testing.T) {
	loopConfigure = false
	defer func() { loopConfigure = true }()
	dir := newDir(t)
	img := filepath.Join(dir, state.ImageFile)
	mnt := createMount(t, dir, 8*miB)
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, mnt, 0, 0, &st); err != nil {
		t.Fatal(err)
	}
	name, err := loopName(st.Dev_major, st.Dev_minor)
	if err != nil {
		t.Fatal(err)
	}
	ac, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "autoclear"))
	if err != nil || strings.TrimSpace(string(ac)) != "1" {
		t.Errorf("/sys/block/%s/loop/autoclear: %q, %v; want 1", name, ac, err)
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if n := loopsNaming(t, img); n != 0 {
		t.Errorf("%d loop devices hold the image after Unmount, want 0", n)
	}
}

// TestMountRefusesOtherMount: something else mounted at dir/fs is an error,
// not success.
func TestMountRefusesOtherMount(t *testing.T) {
	dir := newDir(t)
	if err := Create(context.Background(), dir, 8*miB); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, state.FSDir)
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", target, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	_, err := Mount(context.Background(), dir)
	if err == nil || !strings.Contains(err.Error(), "another filesystem") {
		t.Errorf("Mount over a tmpfs: %v, want an error saying another filesystem is mounted", err)
	}
}

// TestRemoveMissing: a clone whose directory, or even whose parent, is gone
// is removed already.
func TestRemoveMissing(t *testing.T) {
	requireLoop(t)
	parent := filepath.Join(t.TempDir(), "clones")
	for _, dir := range []string{filepath.Join(t.TempDir(), "clone"), filepath.Join(parent, "clone")} {
		if err := Remove(dir); err != nil {
			t.Errorf("Remove(%s) = %v, want success", dir, err)
		}
	}
	if _, err := os.Stat(parent); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Remove created %s: %v", parent, err)
	}
}

// TestImageBytes: ImageBytes, which the node's capacity reports rely on,
// is never less than the image Create makes, and not much more.
func TestImageBytes(t *testing.T) {
	for _, size := range []int64{1, 8 * miB, 100*miB + 1, 1 << 30} {
		dir := newDir(t)
		if err := Create(context.Background(), dir, size); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(filepath.Join(dir, state.ImageFile))
		if err != nil {
			t.Fatal(err)
		}
		got := ImageBytes(size)
		t.Logf("clone of %d bytes: image %d bytes, ImageBytes %d", size, st.Size(), got)
		if got < st.Size() || got > st.Size()+st.Size()/50+miB {
			t.Errorf("ImageBytes(%d) = %d, want at least the image's %d bytes and within 2%% + 1 MiB of it", size, got, st.Size())
		}
	}
	if got := ImageBytes(0); got != 0 {
		t.Errorf("ImageBytes(0) = %d, want 0", got)
	}
}
