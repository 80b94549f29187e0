package layercache

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-csi/strata/test/testimage"
)

// TestMain doubles as the child process of TestCrashMidUnpackLeavesACleanStore:
// with STRATA_CRASH_ROOT set, it pulls STRATA_CRASH_REF into that root and
// is killed by the parent before it finishes.
func TestMain(m *testing.M) {
	if root := os.Getenv("STRATA_CRASH_ROOT"); root != "" {
		s, err := Open(root)
		if err == nil {
			_, err = s.Pull(context.Background(), os.Getenv("STRATA_CRASH_REF"), PullOptions{})
		}
		fmt.Fprintln(os.Stderr, "crash child finished instead of being killed:", err)
		os.Exit(3)
	}
	os.Exit(m.Run())
}

func TestCrashMidUnpackLeavesACleanStore(t *testing.T) {
	requireRoot(t)
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	small := testimage.Tar(t, testimage.File("small", "s"))
	var many []testimage.Entry
	for i := 0; i < 3000; i++ {
		many = append(many, testimage.File(fmt.Sprintf("d%02d/f%04d", i%50, i), strings.Repeat("x", 512)))
	}
	src := testimage.Image(t, testimage.Layer(t, small, testimage.Gzip), testimage.Layer(t, testimage.Tar(t, many...), testimage.None))
	ref := reg + "/crash:v1"
	testimage.Push(t, ref, src)
	sp.set(func(s *spy) { s.delay = 10 * time.Millisecond }) // the big layer trickles in

	root := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "STRATA_CRASH_ROOT="+root, "STRATA_CRASH_REF="+ref)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it once the big layer is half-unpacked in tmp/.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatal("the child never started unpacking")
		}
		partial, _ := filepath.Glob(filepath.Join(root, tmpDir, "w-*", "layer-*", fsDir, "d*", "f*"))
		if len(partial) > 20 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if debris, _ := filepath.Glob(filepath.Join(root, tmpDir, "*")); len(debris) == 0 {
		t.Fatal("the killed child left no work directory: the test did not kill it mid-unpack")
	}

	s := openStore(t, root)
	debris, _ := filepath.Glob(filepath.Join(root, tmpDir, "*"))
	if len(debris) != 1 || debris[0] != s.work {
		t.Errorf("tmp/ after reopen holds %v, want only this process's work dir %s", debris, s.work)
	}
	layers, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		if l.Digest != layerDigests(t, src)[0] {
			t.Errorf("layer %s is visible though its pull was killed", l.DiffID)
		}
		if l.Files != 1 {
			t.Errorf("committed layer %s has %d files, want 1", l.DiffID, l.Files)
		}
	}
	sp.set(func(s *spy) { s.delay = 0 })
	img, err := s.Pull(context.Background(), ref, PullOptions{})
	if err != nil {
		t.Fatalf("pull after the crash: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(mountImage(t, s, img), "d*", "f*"))
	if len(files) != 3000 {
		t.Errorf("merged view has %d files after the re-pull, want 3000", len(files))
	}
}
