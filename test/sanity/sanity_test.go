// Package sanity runs the CSI conformance suite (csi-sanity) against the real
// strata-csi binary, serving controller and node on one socket, with real
// overlay mounts of an image from a loopback registry. It must run as root.
package sanity

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	csitest "github.com/strata-csi/strata/test/csi"
	"github.com/strata-csi/strata/test/testimage"
	"github.com/strata-csi/strata/test/vmtest"
)

// pluginBin is the strata-csi binary TestMain builds.
var pluginBin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		// TestSanity fails loudly; do not build for nothing.
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "strata-sanity-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// STRATA_CSI_BIN names a prebuilt plugin (hack/vm-test).
	if pluginBin = os.Getenv("STRATA_CSI_BIN"); pluginBin == "" {
		if pluginBin, err = csitest.BuildPlugin(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return m.Run()
}

func TestSanity(t *testing.T) {
	csitest.RequireRoot(t)
	// Its expansion specs grow a mounted ext4, which needs CAP_SYS_RESOURCE:
	// where this machine withholds it, the whole suite runs in hack/vm-test's
	// VM, against the same plugin binary.
	if vmtest.GrowElsewhere(t, true) {
		return
	}
	tmp := t.TempDir()
	csitest.CleanupMounts(t, tmp)

	reg := testimage.Registry(t)
	ref := reg + "/sanity/data:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t,
			testimage.Dir("data"),
			testimage.File("data/a.txt", "layer one\n"),
			testimage.File("data/b.txt", "to be deleted\n"),
		), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t,
			testimage.File("data/a.txt", "layer two\n"),
			testimage.Whiteout("data/b.txt"),
		), testimage.Gzip),
	))

	p := csitest.Start(t, csitest.Options{
		Bin:    pluginBin,
		Root:   filepath.Join(tmp, "root"),
		Mode:   "all",
		NodeID: "sanity-node",
	})

	cfg := sanity.NewTestConfig()
	cfg.Address = p.Endpoint
	cfg.TargetPath = filepath.Join(tmp, "mount")
	cfg.StagingPath = filepath.Join(tmp, "staging")
	cfg.TestVolumeParameters = map[string]string{"image": ref}
	cfg.IdempotentCount = 3
	sanity.Test(t, cfg)

	// Whatever csi-sanity published, it unpublished: nothing may stay
	// mounted under the temp dir, and no volume may stay recorded.
	if ms, err := csitest.MountsUnder(tmp); err != nil {
		t.Error(err)
	} else {
		for _, m := range ms {
			t.Errorf("left mounted after csi-sanity: %s (%s)", m.MountPoint, m.FsType)
		}
	}
	if entries, err := os.ReadDir(filepath.Join(tmp, "root", "volumes")); err == nil && len(entries) > 0 {
		for _, e := range entries {
			t.Errorf("volume state left after csi-sanity: volumes/%s", e.Name())
		}
	}
}
