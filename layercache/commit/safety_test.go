package commit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache/unpack"
)

// TestWriteTarXattrRule: a commit keeps exactly the xattrs a pull keeps
// (unpack.KeepXattr): user.* and security.capability, not other trusted.*
// names nor security labels, which the unpacker would drop anyway.
func TestWriteTarXattrRule(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	f := filepath.Join(upper, "f")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	set := map[string]string{
		"user.k":              "v",
		"security.capability": "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
		"trusted.strata":      "t",
		"security.selinux":    "system_u:object_r:etc_t:s0",
	}
	for k, v := range set {
		if err := unix.Setxattr(f, k, []byte(v), 0); err != nil {
			t.Fatalf("setxattr %s: %v", k, err)
		}
	}
	var buf bytes.Buffer
	if _, err := WriteTar(context.Background(), upper, &buf); err != nil {
		t.Fatal(err)
	}
	got, _ := readTar(t, buf.Bytes())
	x := got["f"].xattrs
	for k, v := range set {
		_, has := x[k]
		if keep := unpack.KeepXattr(k); has != keep {
			t.Errorf("committed layer has xattr %s: %v; the unpacker keeps it: %v", k, has, keep)
		} else if has && x[k] != v {
			t.Errorf("xattr %s = %q, want %q", k, x[k], v)
		}
	}
	if len(x) != 2 {
		t.Errorf("committed xattrs %v, want user.k and security.capability only", x)
	}
}

// TestWriteTarSpecialFileSwappedIn: a pod that replaces a regular file by a
// FIFO (or a device node) between the walk's stat and its open must not
// hang the commit (an open of a FIFO without writer blocks forever) nor
// make it open a device: the commit fails with ErrChanged. The swap is made
// deterministic by the test seam afterStat.
func TestWriteTarSpecialFileSwappedIn(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name string
		mode uint32
		dev  int
		dir  bool // swap it in for a directory
	}{
		{"fifo", unix.S_IFIFO | 0o644, 0, false},
		{"char device", unix.S_IFCHR | 0o644, int(unix.Mkdev(1, 3)), false},
		{"fifo for a directory", unix.S_IFIFO | 0o644, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			upper := t.TempDir()
			for _, n := range []string{"a", "b"} {
				if err := os.WriteFile(filepath.Join(upper, n), []byte("data "+n), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tc.dir {
				if err := os.Remove(filepath.Join(upper, "a")); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(filepath.Join(upper, "a"), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			afterStat = func(pfd int, name string) {
				if name != "a" {
					return
				}
				flags := 0
				if tc.dir {
					flags = unix.AT_REMOVEDIR
				}
				if err := unix.Unlinkat(pfd, name, flags); err != nil {
					t.Errorf("swap: unlink: %v", err)
				}
				if err := unix.Mknodat(pfd, name, tc.mode, tc.dev); err != nil {
					t.Errorf("swap: mknod: %v", err)
				}
			}
			defer func() { afterStat = nil }()
			done := make(chan error, 1)
			go func() {
				_, err := WriteTar(context.Background(), upper, io.Discard)
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, ErrChanged) {
					t.Fatalf("WriteTar after a %s was swapped in: got %v, want an error wrapping ErrChanged", tc.name, err)
				}
			case <-time.After(10 * time.Second):
				// Release the walk blocked in open(2): a writer opens the FIFO.
				if fd, err := unix.Open(filepath.Join(upper, "a"), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
					unix.Close(fd)
				}
				<-done
				t.Fatalf("WriteTar hung for 10s on a %s swapped in for a regular file", tc.name)
			}
		})
	}
}

// TestWriteTarDirectoryNamesBounded: a directory with more entries than
// maxDirNames is read in batches, not listed whole into memory, and every
// entry still reaches the layer.
func TestWriteTarDirectoryNamesBounded(t *testing.T) {
	requireRoot(t)
	old := maxDirNames
	maxDirNames = 16
	defer func() { maxDirNames = old }()
	upper := t.TempDir()
	const n = 200
	want := map[string]bool{}
	for _, dir := range []string{"big", "big/sub"} {
		if err := os.MkdirAll(filepath.Join(upper, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		want[dir+"/"] = true
		for i := range n {
			p := filepath.Join(dir, fmt.Sprintf("f%03d", i))
			if err := os.WriteFile(filepath.Join(upper, p), []byte(p), 0o644); err != nil {
				t.Fatal(err)
			}
			want[p] = true
		}
	}
	var buf bytes.Buffer
	st, err := WriteTar(context.Background(), upper, &buf)
	if err != nil {
		t.Fatal(err)
	}
	got, order := readTar(t, buf.Bytes())
	for p := range want {
		if _, ok := got[p]; !ok {
			t.Errorf("no entry %q in the layer", p)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d entries, want %d", len(order), len(want))
	}
	// Two directories deep, each holding at most maxDirNames+1 names.
	if bound := 2 * (maxDirNames + 1); st.peakNames > bound {
		t.Errorf("%d names were held in memory at once, want at most %d", st.peakNames, bound)
	}
}
