package clonefs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestScratch: a scratch image is a journal-less copy of its size's
// template, no less sparse; two copies mount side by side; each takes
// about its size of writes, then ENOSPC; Unmount releases the loop device.
func TestScratch(t *testing.T) {
	requireLoop(t)
	ctx := context.Background()
	base := t.TempDir()
	tmpls, err := NewTemplates(filepath.Join(base, "templates"))
	if err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	var dirs []string
	for _, name := range []string{"a", "b"} {
		dir := filepath.Join(base, name)
		dirs = append(dirs, dir)
		t.Cleanup(func() {
			if err := Remove(dir); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		})
		if err := tmpls.Create(ctx, dir, size); err != nil {
			t.Fatal(err)
		}
	}
	tmpl := filepath.Join(base, "templates", "8M.img")
	// mkfs leaves some ranges allocated but unwritten (they read as
	// zeros, and SEEK_DATA skips them): the copy may be sparser still.
	if d, t0 := fileDisk(t, imagePath(dirs[0])), fileDisk(t, tmpl); d > t0 || d > 1<<20 {
		t.Errorf("the copy holds %d bytes of disk, the template %d; want no more, under 1 MiB", d, t0)
	}
	f, err := os.Open(imagePath(dirs[0]))
	if err != nil {
		t.Fatal(err)
	}
	sb, err := readSuperblock(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sb.label != "strata-8M" {
		t.Errorf("label %q, want strata-8M", sb.label)
	}
	if sb.availBlocks()*blockSize < size {
		t.Errorf("%d bytes free, want at least %d", sb.availBlocks()*blockSize, size)
	}
	// No journal: the superblock's COMPAT_HAS_JOURNAL (0x4) is off.
	raw, _ := os.ReadFile(imagePath(dirs[0]))
	if compat := raw[1024+0x5C]; compat&0x4 != 0 {
		t.Errorf("feature_compat %#x has a journal", compat)
	}

	for _, dir := range dirs {
		fsDir, err := MountScratch(ctx, dir)
		if err != nil {
			t.Fatal(err)
		}
		opts := mountOptions(t, fsDir)
		for _, o := range []string{"discard", "noinit_itable", "nobarrier"} {
			if !strings.Contains(opts, o) {
				t.Errorf("mount options %q, want %s", opts, o)
			}
		}
	}
	for _, dir := range dirs {
		fill := filepath.Join(mountPath(dir), "fill")
		err := os.WriteFile(fill, make([]byte, 2*size), 0o644)
		if !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write 2x the size: %v, want ENOSPC", err)
		}
		fi, _ := os.Stat(fill)
		if fi == nil || fi.Size() < size-(1<<20) || fi.Size() > size+(1<<20) {
			t.Errorf("%s took %v bytes before ENOSPC, want about %d", dir, fi.Size(), size)
		}
	}
	for _, dir := range dirs {
		img := imagePath(dir)
		if err := Unmount(dir); err != nil {
			t.Fatal(err)
		}
		if n := loopsNaming(t, img); n != 0 {
			t.Errorf("%d loop devices still hold %s", n, img)
		}
	}
}

// mountOptions returns the superblock options of the mount at target.
func mountOptions(t *testing.T, target string) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && fields[4] == target {
			return fields[len(fields)-1]
		}
	}
	t.Fatalf("%s is not mounted", target)
	return ""
}
