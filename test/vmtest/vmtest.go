// Package vmtest runs a test again inside a throwaway VM (hack/vm-test) when
// this machine withholds a capability that the test's real kernel path
// needs. Growing a mounted ext4 (a clone's online expansion) needs
// CAP_SYS_RESOURCE, which the root of some development VMs lacks in every
// process's bounding set; in hack/vm-test's VM, root has every capability
// and the test runs against a real kernel, loop device and ext4.
package vmtest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// HasSysResource reports whether this process has CAP_SYS_RESOURCE.
func HasSysResource(t testing.TB) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatalf("parse %q: %v", line, err)
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

// GrowElsewhere reports whether the test t, which grows a mounted ext4,
// ran in hack/vm-test's VM instead of here: when this process lacks
// CAP_SYS_RESOURCE, it runs t again there (with a prebuilt strata-csi when
// plugin is set) and fails t if it fails there; the caller then returns.
// Where the capability is present (in the VM, or on a node that has it) it
// returns false and the test runs here.
func GrowElsewhere(t *testing.T, plugin bool) bool {
	t.Helper()
	if HasSysResource(t) {
		return false
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	root := dir
	for {
		if _, err := os.Stat(filepath.Join(root, "hack", "vm-test")); err == nil {
			break
		}
		if root == "/" {
			t.Fatalf("no hack/vm-test above %s", dir)
		}
		root = filepath.Dir(root)
	}
	rel, err := filepath.Rel(root, dir)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.SplitN(t.Name(), "/", 2)[0]
	cmd := exec.Command(filepath.Join(root, "hack", "vm-test"), "./"+rel, "^"+name+"$")
	cmd.Dir = root
	cmd.Env = os.Environ()
	if plugin {
		cmd.Env = append(cmd.Env, "VM_TEST_PLUGIN=1")
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	t.Logf("this machine withholds CAP_SYS_RESOURCE, which growing a mounted ext4 needs: %s ran in hack/vm-test's VM (%.1f s):\n%s",
		name, time.Since(start).Seconds(), out.String())
	if err != nil {
		t.Fatalf("%s failed in hack/vm-test's VM: %v", name, err)
	}
	return true
}
