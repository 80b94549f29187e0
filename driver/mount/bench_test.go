package mount

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// benchStack makes n lower dirs (one file each) on the disk, an upper and a
// work dir on a tmpfs, and a target. Paths are short, so the floor can pass
// them as fsconfig strings.
//
// The upper is on a tmpfs because unmounting an overlay syncs its upper: on
// ext4 that is a journal commit of a millisecond or more, which varies with
// whatever else the machine writes and drowns the cost being measured.
func benchStack(b *testing.B, n int) (lowers []string, upper, work, target string) {
	b.Helper()
	d := b.TempDir()
	for i := range n {
		l := mkdir(b, fmt.Sprintf("%s/l%d", d, i))
		writeFile(b, fmt.Sprintf("%s/f%d", l, i), "x")
		lowers = append(lowers, l)
	}
	tmp := mkdir(b, d+"/tmpfs")
	if err := unix.Mount("tmpfs", tmp, "tmpfs", 0, "size=16m"); err != nil {
		b.Fatal(err)
	}
	cleanupUnmount(b, tmp)
	return lowers, mkdir(b, tmp+"/u"), mkdir(b, tmp+"/w"), mkdir(b, d+"/m")
}

var benchLayers = []int{8, 100}

// BenchmarkMountOverlay is one MountOverlay+Unmount cycle with an upper,
// through the package (probed API: fsconfig with fds on this kernel).
func BenchmarkMountOverlay(b *testing.B) {
	requireRoot(b)
	for _, n := range benchLayers {
		b.Run(fmt.Sprintf("layers=%d", n), func(b *testing.B) {
			lowers, upper, work, target := benchStack(b, n)
			o := Overlay{Lowers: lowers, Upper: upper, Work: work}
			for b.Loop() {
				if err := MountOverlay(o, target); err != nil {
					b.Fatal(err)
				}
				if err := Unmount(target); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkMountOverlayFloor is the kernel floor for the same cycle: bare
// fsopen / fsconfig(lowerdir+ as a path string, upperdir, workdir) / create
// / fsmount / move_mount / umount2, no package code and no error handling
// beyond a fatal. Compare with BenchmarkMountOverlay for the package's
// overhead (O_PATH opens, source, logging, error wrapping).
func BenchmarkMountOverlayFloor(b *testing.B) {
	requireRoot(b)
	for _, n := range benchLayers {
		b.Run(fmt.Sprintf("layers=%d", n), func(b *testing.B) {
			lowers, upper, work, target := benchStack(b, n)
			for b.Loop() {
				fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
				if err != nil {
					b.Fatal(err)
				}
				for _, l := range lowers {
					if err := unix.FsconfigSetString(fsfd, "lowerdir+", l); err != nil {
						b.Fatal(err)
					}
				}
				if err := unix.FsconfigSetString(fsfd, "upperdir", upper); err != nil {
					b.Fatal(err)
				}
				if err := unix.FsconfigSetString(fsfd, "workdir", work); err != nil {
					b.Fatal(err)
				}
				if err := unix.FsconfigCreate(fsfd); err != nil {
					b.Fatal(err)
				}
				mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
				if err != nil {
					b.Fatal(err)
				}
				if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
					b.Fatal(err)
				}
				unix.Close(mfd)
				unix.Close(fsfd)
				if err := unix.Unmount(target, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkMountOverlayFloorFd is the floor with lowers passed as O_PATH
// fds, as the package does (no length limit), opened and closed per cycle.
func BenchmarkMountOverlayFloorFd(b *testing.B) {
	requireRoot(b)
	for _, n := range benchLayers {
		b.Run(fmt.Sprintf("layers=%d", n), func(b *testing.B) {
			lowers, upper, work, target := benchStack(b, n)
			setFd := func(fsfd int, key, path string) {
				fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
				if err != nil {
					b.Fatal(err)
				}
				if err := unix.FsconfigSetFd(fsfd, key, fd); err != nil {
					b.Fatal(err)
				}
				unix.Close(fd)
			}
			for b.Loop() {
				fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
				if err != nil {
					b.Fatal(err)
				}
				for _, l := range lowers {
					setFd(fsfd, "lowerdir+", l)
				}
				setFd(fsfd, "upperdir", upper)
				setFd(fsfd, "workdir", work)
				if err := unix.FsconfigCreate(fsfd); err != nil {
					b.Fatal(err)
				}
				mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
				if err != nil {
					b.Fatal(err)
				}
				if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
					b.Fatal(err)
				}
				unix.Close(mfd)
				unix.Close(fsfd)
				if err := unix.Unmount(target, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
