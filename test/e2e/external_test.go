//go:build e2e

package e2e

import (
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Specs of the external suite that Strata's driver definition selects but
// that skip by design, with the reason. A skip not listed here fails the
// test: every skip must be explained.
var explainedSkips = map[string]string{
	"should support expansion of pvcs created for ephemeral pvcs": "the suite skips expansion for CSI inline volumes (\"Skipping CSIInlineVolume test for expansion\"): an inline volume has no PVC to expand",
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

// testExternalStorageSuite runs Kubernetes' own external-storage e2e tests
// (e2e-storage.test at the cluster's version) against Strata's inline ephemeral
// volumes, and requires 0 failures, at least the four specs known to apply,
// and an explanation for every skip.
func testExternalStorageSuite(t *testing.T) {
	driver, err := filepath.Abs(filepath.Join("testdata", "test-driver.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	bin := e2eTestBin(t)
	report := t.TempDir()
	args := []string{"netns", "exec", c.netns, bin,
		"-kubeconfig=" + c.kubeconfig, "-provider=skeleton",
		"-storage.testdriver=" + driver, "-report-dir=" + report,
		"-kubelet-root-dir=" + c.kubeletDir,
		`-ginkgo.focus=External.Storage.*strata\.csi\.dev`,
		`-ginkgo.skip=\[Disruptive\]|\[Serial\]|\[Feature:`,
		"-ginkgo.no-color", "-ginkgo.timeout=20m"}
	if testing.Verbose() {
		args = append(args, "-ginkgo.v")
	}
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
	start := time.Now()
	out, runErr := cmd.CombinedOutput()
	t.Logf("e2e-storage.test (%s) ran %.1f s", bin, time.Since(start).Seconds())
	if i := strings.LastIndex(string(out), "Ran "); i >= 0 {
		t.Logf("%s", strings.TrimSpace(string(out[i:])))
	}
	if runErr != nil {
		t.Errorf("e2e-storage.test: %v\n%s", runErr, tail(string(out), 200))
	}

	b, err := os.ReadFile(filepath.Join(report, "junit_01.xml"))
	if err != nil {
		t.Fatalf("junit report: %v", err)
	}
	var j junitSuites
	if err := xml.Unmarshal(b, &j); err != nil {
		t.Fatalf("junit report: %v", err)
	}
	var passed int
	for _, s := range j.Suites {
		for _, tc := range s.Cases {
			if !strings.Contains(tc.Name, "strata.csi.dev") {
				continue // not selected: every other spec of the suite
			}
			switch {
			case tc.Failure != nil || tc.Error != nil:
				t.Errorf("FAILED: %s", tc.Name)
			case tc.Skipped != nil:
				reason := ""
				for spec, why := range explainedSkips {
					if strings.Contains(tc.Name, spec) {
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
	if passed < 4 {
		t.Errorf("%d specs passed, want at least the 4 inline ephemeral specs", passed)
	}
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
