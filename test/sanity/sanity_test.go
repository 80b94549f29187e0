// Package sanity runs the CSI conformance suite (csi-sanity) against the real
// strata-csi binary, serving controller and node on one socket, with real
// overlay mounts of an image from a loopback registry. It must run as root.
package sanity

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"

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

// counts are the specs of the last csi-sanity run, by outcome, which
// ReportAfterSuite collects.
var counts map[types.SpecState]int

var _ = ginkgo.ReportAfterSuite("spec counts", func(r types.Report) {
	counts = map[types.SpecState]int{}
	for _, s := range r.SpecReports {
		if s.LeafNodeType == types.NodeTypeIt {
			counts[s.State]++
		}
	}
})

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
	checkReadme(t, counts)

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

// What the README says of csi-sanity: "N specs pass, M fail", "marks one
// spec pending (...) and skips K", then a table of the skipped specs whose
// rows count them, "| what (N), other (M) | why |".
var (
	readmePassFail = regexp.MustCompile(`(\d+) specs pass, (\d+) fail`)
	readmeSkips    = regexp.MustCompile(`marks (\w+) specs? pending \([^)]*\) and skips (\d+)`)
	readmeTable    = regexp.MustCompile(`(?m)(?:^\|.*\n)+`)
	readmeRowCount = regexp.MustCompile(`\((\d+)\)`)
	numberWords    = map[string]int{"no": 0, "one": 1, "two": 2, "three": 3}
)

// checkReadme holds the README's csi-sanity counts to the run's: a number
// that the README states is one this run measured.
func checkReadme(t *testing.T, got map[types.SpecState]int) {
	t.Helper()
	if got == nil {
		t.Fatal("csi-sanity's report did not reach ReportAfterSuite")
	}
	data, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(data)
	m := readmePassFail.FindStringSubmatch(readme)
	s := readmeSkips.FindStringSubmatchIndex(readme)
	if m == nil || s == nil {
		t.Fatalf("README.md does not state csi-sanity's counts as %q and %q", readmePassFail, readmeSkips)
	}
	pending, ok := numberWords[readme[s[2]:s[3]]]
	if !ok {
		t.Fatalf("README.md: pending count %q is not a number word", readme[s[2]:s[3]])
	}
	skipped, _ := strconv.Atoi(readme[s[4]:s[5]])
	// The table that follows: each row's first cell counts its specs, "(N)",
	// more than one kind of spec a count each.
	table := 0
	for _, row := range strings.Split(readmeTable.FindString(readme[s[1]:]), "\n") {
		if cells := strings.Split(row, "|"); len(cells) > 2 {
			for _, n := range readmeRowCount.FindAllStringSubmatch(cells[1], -1) {
				v, _ := strconv.Atoi(n[1])
				table += v
			}
		}
	}
	passed, _ := strconv.Atoi(m[1])
	failed, _ := strconv.Atoi(m[2])
	for _, c := range []struct {
		what        string
		readme, run int
	}{
		{"passed", passed, got[types.SpecStatePassed]},
		{"failed", failed, got[types.SpecStateFailed]},
		{"pending", pending, got[types.SpecStatePending]},
		{"skipped", skipped, got[types.SpecStateSkipped]},
		{"skipped (the sum of the README's table of skipped specs)", table, got[types.SpecStateSkipped]},
	} {
		if c.readme != c.run {
			t.Errorf("README.md says csi-sanity %s %d specs; this run: %d (update the README's Conformance section)", c.what, c.readme, c.run)
		}
	}
}
