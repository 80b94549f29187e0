//go:build e2e

package e2e

import (
	"encoding/xml"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// suiteKind is one kind of volume that Strata offers, as the external
// suite sees it: a driver definition (testdata), the StorageClass it names,
// which specs apply, and the specs it selects that skip by design, with the
// reason. A skip not explained fails the test: every skip must be
// explained, and a skip for a capability Strata could offer is a gap, not a
// reason (test/README.md lists them).
type suiteKind struct {
	name       string
	definition string // in testdata
	// class is the StorageClass manifest the definition names (""
	// for inline volumes), with %s for the image.
	class string
	// focus selects the specs that apply, beyond the driver's name.
	focus string
	// minPassed is how many specs must pass at least.
	minPassed int
	skips     map[string]string
	// exclude are specs that cannot run on this machine, by name, with
	// why: they are left out of the run and listed in test/README.md.
	exclude map[string]string
	// grows: the kind's claims grow (expansion specs apply).
	grows bool
}

// pid1 is why the specs whose host exec pod looks at the node are left
// out: it enters PID 1's mount namespace (nsenter
// --mount=/rootfs/proc/1/ns/mnt), which this VM's init refuses
// ("Permission denied"), so the spec cannot see the node's mounts.
const pid1 = "the suite's host exec pod enters PID 1's mount namespace, which this VM's init refuses (permission denied): the spec cannot look at the node"

// conformanceClass is the StorageClass of the clone kind.
const conformanceClass = "strata-e2e-conformance-clone"

var suiteKinds = []suiteKind{
	{
		name: "inline", definition: "test-driver.yaml", minPassed: 4,
		skips: map[string]string{
			"should support expansion of pvcs created for ephemeral pvcs": "the suite skips expansion for CSI inline volumes (\"Skipping CSIInlineVolume test for expansion\"): an inline volume has no PVC to expand",
		},
	},
	{
		name: "clone", definition: "test-driver-clone.yaml", minPassed: 18, grows: true,
		class: `apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: ` + conformanceClass + `
provisioner: strata.csi.dev
parameters:
  image: %s
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
`,
		skips: map[string]string{
			"Not enough topologies in cluster":                                    "the cluster has one node; a conflicting topology needs a second one (the many-nodes issue)",
			"VolumeBindingMode immediate is not compatible with a multi-topology": "the suite's own rule for a driver whose volumes live on one node (TopologyKeys): generic ephemeral volumes bind late",
			"Multiple generic ephemeral volumes with immediate binding":           "the suite's own rule for a driver whose volumes live on one node",
			"does not support ROX access mode":                                    "a clone lives on one node; a ReadOnlyMany claim of the class is the image itself, which has no writes to clone from",
			"WaitForFirstConsumer binding mode currently not supported":           "the suite's own rule: its performance specs need Immediate binding, and a clone needs its node first (WaitForFirstConsumer)",
			"Filesystem volume case should be covered by block volume case":       "the suite's own rule: it tests mixed volume modes only with block volumes, which an overlay is not",
			"only supports single node":                                           "a clone lives on one node (singleNodeVolume)",
			"only supports singleNodeVolume":                                      "a clone lives on one node: the specs that move a volume between nodes do not apply",
			"doesn't support RWX":                                                 "a clone is ReadWriteOnce: its writes live on one node",
		},
		exclude: map[string]string{
			"volumeMode should not mount / map unused volumes in a pod":                   pid1,
			"should unmount if pod is force deleted while kubelet is down":                pid1,
			"should unmount if pod is gracefully deleted while kubelet is down":           pid1,
			"should remount stale subpath bind mount after network filesystem disruption": pid1,
			"should provision storage with any volume data source": "it needs the sig-storage hello-populator and volume-data-source-validator images, " +
				"which no registry here serves and whose sources are not on the module proxy",
		},
	},
	{
		name: "image (ReadOnlyMany)", definition: "test-driver-image.yaml", minPassed: 2,
		class: `apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: strata-e2e-conformance-image
provisioner: strata.csi.dev
parameters:
  image: %s
reclaimPolicy: Delete
volumeBindingMode: Immediate
`,
		// A claim that only reads is the image itself: only the specs that
		// never write to the volume apply.
		focus: `.*(should create read-only inline ephemeral volume|concurrently access the single read-only volume)`,
		skips: map[string]string{},
	},
}

type junitSuites struct {
	Suites []struct {
		Cases []junitCase `xml:"testcase"`
	} `xml:"testsuite"`
}

type junitCase struct {
	Name    string `xml:"name,attr"`
	Status  string `xml:"status,attr"`
	Skipped *struct {
		Message string `xml:"message,attr"`
	} `xml:"skipped"`
	Failure *struct {
		Message string `xml:"message,attr"`
	} `xml:"failure"`
	Error *struct {
		Message string `xml:"message,attr"`
	} `xml:"error"`
}

// e2eTestBin returns the path of e2e-storage.test: STRATA_E2E_TEST_BIN, or
// what the build that hack/e2e runs in the background (while the cluster
// comes up and the scenarios before this one run) leaves in the directory
// STRATA_E2E_TEST_BUILD: its bin directory in bindir, its exit status in rc,
// its output in log.
func e2eTestBin(t *testing.T) string {
	t.Helper()
	if c.e2eTest != "" {
		return c.e2eTest
	}
	dir := c.e2eBuild
	start := time.Now()
	var rc []byte
	eventually(t, 20*time.Minute, "the background build of e2e-storage.test ("+dir+")", func() (bool, error) {
		var err error
		rc, err = os.ReadFile(filepath.Join(dir, "rc"))
		return err == nil, nil
	})
	if strings.TrimSpace(string(rc)) != "0" {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Fatalf("building e2e-storage.test failed (exit %s):\n%s", strings.TrimSpace(string(rc)), log)
	}
	bindir, err := os.ReadFile(filepath.Join(dir, "bindir"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("waited %.1f s for the background build of e2e-storage.test", time.Since(start).Seconds())
	return filepath.Join(strings.TrimSpace(string(bindir)), "e2e-storage.test")
}

// conformance reports whether the run includes the external suite's
// [Slow], [Serial] and [Disruptive] specs (make conformance sets
// STRATA_CONFORMANCE=1); make test runs the others.
func conformance() bool { return os.Getenv("STRATA_CONFORMANCE") == "1" }

// matrix reports whether this run is make matrix's: make test's selection
// on the version matrix's other Kubernetes and containerd.
func matrix() bool { return os.Getenv("STRATA_MATRIX") == "1" }

// testExternalStorageSuite runs Kubernetes' own external-storage e2e tests
// (e2e-storage.test at the cluster's version) against every kind of volume
// that Strata offers, and requires, per kind, 0 failures, at least the
// specs known to apply, and an explanation for every skip.
func testExternalStorageSuite(t *testing.T) {
	bin := e2eTestBin(t)
	importSuiteImages(t, bin)
	for _, k := range suiteKinds {
		t.Run(strings.ReplaceAll(k.name, " ", "_"), func(t *testing.T) { runSuiteKind(t, bin, k) })
	}
}

// importSuiteImages imports into the cluster's containerd the images that
// the suite's specs run besides busybox (agnhost, and stand-ins for nginx
// and glibc-dns-testing), which hack/cluster/build makes beside
// e2e-storage.test: no registry serves them here.
func importSuiteImages(t *testing.T, bin string) {
	t.Helper()
	tars, err := filepath.Glob(filepath.Join(filepath.Dir(filepath.Dir(bin)), "images", "*.tar"))
	if err != nil || len(tars) < 3 {
		t.Fatalf("the suite's images beside %s: %v (%v): rebuild with hack/cluster/build e2e", bin, tars, err)
	}
	for _, tar := range tars {
		start := time.Now()
		out, err := exec.Command(c.ctrBin, "images", "import", tar).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr images import %s: %v\n%s", tar, err, out)
		}
		t.Logf("imported %s in %.1f s", filepath.Base(tar), time.Since(start).Seconds())
	}
	// The suite's busybox tag is its version's (1.37.0-1 in v1.35): the
	// cluster's busybox goes by that name too.
	out, err := exec.Command(filepath.Join(filepath.Dir(bin), "e2eimages"), "--busybox").Output()
	if err != nil {
		t.Fatalf("e2eimages --busybox: %v", err)
	}
	if name := strings.TrimSpace(string(out)); name != busybox {
		if out, err := exec.Command(c.ctrBin, "images", "tag", "--force", busybox, name).CombinedOutput(); err != nil {
			t.Fatalf("ctr images tag %s %s: %v\n%s", busybox, name, err, out)
		}
		t.Logf("tagged %s as %s, the suite's busybox", busybox, name)
	}
}

func runSuiteKind(t *testing.T, bin string, k suiteKind) {
	driver, err := filepath.Abs(filepath.Join("testdata", k.definition))
	if err != nil {
		t.Fatal(err)
	}
	if k.class != "" {
		manifest := fmt.Sprintf(k.class, conformanceRef)
		if out, err := kubectlStdin(manifest, "apply", "-f", "-"); err != nil {
			t.Fatalf("create the kind's StorageClass: %v\n%s", err, out)
		}
		t.Cleanup(func() {
			if out, err := kubectlStdin(manifest, "delete", "--ignore-not-found", "-f", "-"); err != nil {
				t.Errorf("delete the kind's StorageClass: %v\n%s", err, out)
			}
		})
	}
	skip := `\[Disruptive\]|\[Serial\]|\[Slow\]|\[Feature:`
	if conformance() {
		skip = `\[Feature:`
	}
	exclude := maps.Clone(k.exclude)
	if k.grows && !resizeCapability(t) {
		// The node refuses to grow a mounted ext4 without it (TestCloneExpand
		// proves the refusal; the grow itself runs in hack/vm-test's VM).
		for _, spec := range []string{"volume-expand", "should support expansion of pvcs created for ephemeral pvcs"} {
			exclude[spec] = "this machine withholds CAP_SYS_RESOURCE, without which no process grows a mounted ext4 (the grow is proven in hack/vm-test's VM)"
		}
	}
	for spec, why := range exclude {
		skip += "|" + regexp.QuoteMeta(spec)
		t.Logf("not run: %s: %s", spec, why)
	}
	focus := `External.Storage.*strata\.csi\.dev` + k.focus
	if f := os.Getenv("STRATA_E2E_FOCUS"); f != "" {
		focus += ".*" + f // a closer look at some specs: hack/e2e -run 'TestStrata/(Install|ExternalStorageSuite)'
	}
	report := t.TempDir()
	args := []string{"netns", "exec", c.netns, bin,
		"-kubeconfig=" + c.kubeconfig, "-provider=local",
		"-storage.testdriver=" + driver, "-report-dir=" + report,
		"-kubelet-root-dir=" + c.kubeletDir,
		"-ginkgo.focus=" + focus,
		"-ginkgo.skip=" + skip,
		"-ginkgo.no-color", "-ginkgo.timeout=60m"}
	if testing.Verbose() {
		args = append(args, "-ginkgo.v")
	}
	cmd := exec.Command("ip", args...)
	// The [Disruptive] specs restart the kubelet with ssh to the node, as
	// root, with the key of the cluster's sshd (hack/cluster-up).
	// (provider local: the framework's own provider for a cluster it does
	// not manage, which the kubelet-restart specs accept).
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig, "LOCAL_SSH_KEY="+c.sshKey, "KUBE_SSH_KEY="+c.sshKey, "KUBE_SSH_USER=root")
	start := time.Now()
	out, runErr := cmd.CombinedOutput()
	t.Logf("e2e-storage.test (%s, %s) ran %.1f s", k.name, k.definition, time.Since(start).Seconds())
	if i := strings.LastIndex(string(out), "Ran "); i >= 0 {
		t.Logf("%s", strings.TrimSpace(string(out[i:])))
	}
	if runErr != nil {
		// The whole output, kept for a look: the failures' own messages are
		// far above its tail.
		keep := filepath.Join(os.TempDir(), "strata-e2e-storage-"+strings.ReplaceAll(k.name, " ", "_")+".log")
		if err := os.WriteFile(keep, out, 0o644); err != nil {
			t.Log(err)
		}
		t.Errorf("e2e-storage.test: %v (whole output in %s)\n%s", runErr, keep, tail(string(out), 200))
	}

	b, err := os.ReadFile(filepath.Join(report, "junit_01.xml"))
	if err != nil {
		t.Fatalf("junit report: %v", err)
	}
	var j junitSuites
	if err := xml.Unmarshal(b, &j); err != nil {
		t.Fatalf("junit report: %v", err)
	}
	selected, notSelected := regexp.MustCompile(focus), regexp.MustCompile(skip)
	var passed, failed, skipped, undeclared int
	for _, s := range j.Suites {
		for _, tc := range s.Cases {
			if !selected.MatchString(tc.Name) || notSelected.MatchString(tc.Name) {
				continue // not selected: every other spec of the suite, and those this run leaves out
			}
			switch {
			case tc.Failure != nil || tc.Error != nil:
				failed++
				t.Errorf("FAILED: %s", tc.Name)
			case tc.Skipped != nil && undeclaredPattern.MatchString(tc.Skipped.Message):
				// Not a spec of this definition: v1.37's suite does not
				// register it at all, and it is not counted.
				undeclared++
			case tc.Skipped != nil:
				skipped++
				reason := ""
				for spec, why := range k.skips { // by the spec's name, or the suite's reason
					if strings.Contains(tc.Name, spec) || strings.Contains(tc.Skipped.Message, spec) {
						reason = why
					}
				}
				if reason == "" {
					t.Errorf("skipped without an explanation: %s (%s)", tc.Name, tc.Skipped.Message)
				} else {
					t.Logf("skipped: %s: %s", tc.Name, reason)
				}
			default:
				passed++
				t.Logf("passed: %s", tc.Name)
			}
		}
	}
	t.Logf("kind %s: %d passed, %d failed, %d skipped", k.name, passed, failed, skipped)
	if undeclared > 0 {
		t.Logf("kind %s: %d specs of test patterns or capabilities the definition does not declare, which this suite's version skips when they run (v1.37 does not register them), not counted", k.name, undeclared)
	}
	if passed < k.minPassed {
		t.Errorf("%d specs passed, want at least the %d known to apply", passed, k.minPassed)
	}
	if os.Getenv("STRATA_E2E_FOCUS") == "" {
		checkCountsTable(t, k.definition, fmt.Sprintf("%d / %d / %d", passed, failed, skipped))
	}
}

// undeclaredPattern matches the skip messages with which a suite before
// v1.36 passes over the specs that do not apply to the driver definition
// at all: a test pattern (volume type, volume mode, filesystem type) it
// does not declare, or a suite whose capability it does not declare (raw
// block, fsGroup, ReadWriteOncePod, volume limits, snapshots...). These are
// the checks that v1.37's suite makes before it registers a spec
// (storageframework.SkipInvalidDriverPatternCombination, the external
// driver's SkipUnsupportedTest, each suite's SkipUnsupportedTests), so
// that those specs never run or count there; v1.35 makes them when the
// spec runs, in the same words followed by "skipping". A skip inside a
// spec that applies (a cluster shape, a mode the spec needs) is not
// matched: it keeps needing its reason.
var undeclaredPattern = regexp.MustCompile(strings.Join([]string{
	// storageframework and the external driver: the pattern.
	`Driver ` + driverWord + ` (doesn't support|does not support volume type) "?(` + patternValues + `)?"? -{1,2} skipping`,
	`Suite "[^"]+" does not support (` + patternValues + `)\s*$`,
	// The suites' SkipUnsupportedTests: a capability.
	`Driver ` + driverWord + ` (does not support|doesn't support) (FsGroup|ReadWriteOncePod|SELinuxMount|snapshots|dynamic provisioning|topology|volume expansion|block volume mode|group snapshots|VolumeAttributesClass tests) - skipping`,
	`Driver ` + driverWord + ` does not support volume limits\s*$`,
	`Driver ` + driverWord + ` does not provide raw block - skipping`,
	`Driver ` + driverWord + ` doesn't publish storage capacity -- skipping`,
	`Driver ` + driverWord + ` doesn't specify (snapshot |volume modify )?stress test options -- skipping`,
	`Driver ` + driverWord + ` doesn't implement (SnapshottableTestDriver|DynamicPVTestDriver) -{1,2} skipping`,
	`Test does not support non-filesystem volume mode - skipping`,
}, "|"))

// driverWord is a driver's name in a skip message, quoted or not.
const driverWord = `"?[^ "]+"?`

// patternValues are the values of a test pattern's volume type, volume
// mode and filesystem type.
const patternValues = `InlineVolume|PreprovisionedPV|DynamicPV|CSIInlineVolume|GenericEphemeralVolume|Block|Filesystem|ext2|ext3|ext4|xfs|ntfs`

// countsTable is the page whose table gives the suite's counts per kind:
// a row per definition, with the counts of make test and of make
// conformance.
const countsTable = "../README.md" // test/README.md, from test/e2e

// checkCountsTable fails the test when the counts table's row of the
// definition does not say what this run counted (in the make test
// column, or the make conformance one): the documented numbers are those
// of the last run, never older.
func checkCountsTable(t *testing.T, definition, got string) {
	t.Helper()
	col, run := 3, "make test"
	switch {
	case matrix():
		col, run = 5, "make matrix"
	case conformance():
		col, run = 4, "make conformance"
	}
	b, err := os.ReadFile(countsTable)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 7 || strings.TrimSpace(cells[2]) != "`"+definition+"`" {
			continue
		}
		if want := strings.TrimSpace(cells[col]); want != got {
			t.Errorf("test/README.md says %s: %s for %s; this run counted %s: update the table", run, want, definition, got)
		}
		return
	}
	t.Errorf("test/README.md has no row for %s in its counts table (this run: %s: %s)", definition, run, got)
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
