//go:build cluster

// Package cluster tests hack/cluster-up and hack/cluster-down: a real
// single-node Kubernetes cluster inside its own network namespace, a pod from
// a locally built image, and a host network that is byte-identical after
// teardown. It needs root and runs only with the build tag:
//
//	go test -tags cluster -timeout 30m ./test/cluster
//
// The binaries are built on the first run (minutes, cached by version under
// ~/.cache/strata/cluster). By default the test uses its own cluster dir, network
// namespace, cgroup root and pod CIDR so that it does not disturb a cluster
// started by hand; STRATA_CLUSTER_DIR overrides the dir. K8S_VERSION,
// CONTAINERD, CONTAINERD_VERSION, ETCD and ETCD_VERSION pass through.
package cluster

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

const (
	testImage = "localhost/strata-test/busybox:cluster-test"
	marker    = "strata-cluster-test-marker"
)

func repoRoot(t *testing.T) string {
	_, file, _, _ := runtime.Caller(0)
	root, err := filepath.Abs(filepath.Join(filepath.Dir(file), "..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

type cluster struct {
	t    *testing.T
	root string
	dir  string
	env  []string
}

func (c *cluster) run(name string, args ...string) (string, error) {
	c.t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = c.root
	cmd.Env = c.env
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func (c *cluster) must(name string, args ...string) string {
	c.t.Helper()
	out, err := c.run(name, args...)
	if err != nil {
		c.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func (c *cluster) kubectl(args ...string) string {
	c.t.Helper()
	return c.must(filepath.Join(c.dir, "bin", "kubectl"), args...)
}

func (c *cluster) snapshot() string {
	c.t.Helper()
	return c.must(filepath.Join(c.root, "hack", "cluster", "hostnet-snapshot"))
}

// network returns the snapshot without the kernel tunables, which the kubelet
// changes while it runs (cluster-down restores them).
func network(snap string) string {
	if i := strings.Index(snap, "\n### kernel tunables"); i >= 0 {
		return snap[:i]
	}
	return snap
}

func diff(t *testing.T, a, b string) string {
	dir := t.TempDir()
	pa, pb := filepath.Join(dir, "before"), filepath.Join(dir, "after")
	os.WriteFile(pa, []byte(a), 0o644)
	os.WriteFile(pb, []byte(b), 0o644)
	out, _ := exec.Command("diff", "-u", pa, pb).CombinedOutput()
	return string(out)
}

func TestClusterUpPodDown(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root := repoRoot(t)
	dir := os.Getenv("STRATA_CLUSTER_DIR")
	if dir == "" {
		dir = "/tmp/strata-cluster-test"
	}
	env := os.Environ()
	for _, kv := range []string{
		"CLUSTER_DIR=" + dir,
		"CLUSTER_NETNS=strata-test",
		"CGROUP_ROOT=strata-cluster-test",
		"POD_CIDR=10.90.0.0/24",
	} {
		if os.Getenv(strings.SplitN(kv, "=", 2)[0]) == "" {
			env = append(env, kv)
		}
	}
	env = append(env, "NODES=1") // the single-node layout, whatever the caller's NODES
	c := &cluster{t: t, root: root, dir: dir, env: env}
	up := filepath.Join(root, "hack", "cluster-up")
	down := filepath.Join(root, "hack", "cluster-down")

	// Packages first (iptables-save must exist before the first snapshot),
	// then the binaries (cold: minutes), so that the timing below is the
	// bring-up alone.
	c.must(up, "--deps-only")
	start := time.Now()
	c.must(up, "--build-only")
	t.Logf("build (or cache check): %.1f s", time.Since(start).Seconds())

	before := c.snapshot()
	tornDown := false
	t.Cleanup(func() {
		if !tornDown {
			if out, err := c.run(down, "--purge"); err != nil {
				t.Errorf("cleanup cluster-down: %v\n%s", err, out)
			}
		}
	})

	start = time.Now()
	out := c.must(up)
	t.Logf("cluster-up to node Ready + default ServiceAccount: %.1f s", time.Since(start).Seconds())
	t.Logf("cluster-up output:\n%s", out)

	// Idempotent: a second run changes nothing and is fast.
	start = time.Now()
	c.must(up)
	t.Logf("cluster-up again: %.1f s", time.Since(start).Seconds())

	ready := c.kubectl("get", "nodes", "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	if !strings.Contains(ready, "=True") {
		t.Fatalf("no Ready node: %q", ready)
	}
	t.Logf("nodes: %s", strings.TrimSpace(ready))
	t.Logf("versions:\n%s", c.kubectl("get", "nodes", "-o", "wide"))

	// While the cluster runs, the host's network is what it was.
	if d := diff(t, network(before), network(c.snapshot())); d != "" {
		t.Errorf("host network changed while the cluster runs:\n%s", d)
	}

	// A pod from a busybox image built here (Debian's busybox-static in an
	// OCI archive), imported with ctr, never pulled. It checks its routes (no
	// default route) and reaches the apiserver through the service VIP
	// (kube-proxy's rules inside the cluster's namespace).
	img := t.TempDir()
	rootfs := filepath.Join(img, "rootfs")
	for _, d := range []string{"bin", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.must("cp", "/bin/busybox", filepath.Join(rootfs, "bin", "busybox"))
	for _, a := range []string{"sh", "cat", "ip", "echo", "grep", "nc"} {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", a)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(rootfs, "etc", "marker"), []byte(marker+"\n"), 0o644)
	archive := filepath.Join(img, "busybox.tar")
	c.must(filepath.Join(root, "hack", "cluster", "ociimage"), rootfs, testImage, archive, "/bin/sh")
	c.must(filepath.Join(dir, "bin", "ctr"), "images", "import", archive)

	pod := `apiVersion: v1
kind: Pod
metadata:
  name: cluster-test
  namespace: default
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: ` + testImage + `
    imagePullPolicy: Never
    command: ["/bin/sh", "-c"]
    args:
    - cat /etc/marker; echo written > /tmp/w; cat /tmp/w; echo routes:; ip -4 route;
      echo | nc -w 3 10.96.0.1 443 && echo service-vip-reachable; echo end
`
	podFile := filepath.Join(img, "pod.yaml")
	os.WriteFile(podFile, []byte(pod), 0o644)
	start = time.Now()
	c.kubectl("apply", "-f", podFile)
	var phase string
	for deadline := time.Now().Add(120 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		phase = c.kubectl("get", "pod", "cluster-test", "-o", "jsonpath={.status.phase}")
		if phase == "Succeeded" || phase == "Failed" {
			break
		}
	}
	t.Logf("pod apply -> %s: %.1f s", phase, time.Since(start).Seconds())
	if phase != "Succeeded" {
		out, _ := c.run(filepath.Join(dir, "bin", "kubectl"), "describe", "pod", "cluster-test")
		t.Fatalf("pod phase %q\n%s", phase, out)
	}
	logs := c.kubectl("logs", "cluster-test")
	t.Logf("pod output:\n%s", logs)
	for _, want := range []string{marker, "written", "service-vip-reachable", "end"} {
		if !strings.Contains(logs, want) {
			t.Errorf("pod output lacks %q", want)
		}
	}
	if strings.Contains(logs, "default") {
		t.Errorf("pod has a default route:\n%s", logs)
	}
	c.kubectl("delete", "pod", "cluster-test", "--wait=true")

	start = time.Now()
	out = c.must(down, "--purge")
	tornDown = true
	t.Logf("cluster-down --purge: %.1f s\n%s", time.Since(start).Seconds(), out)

	after := c.snapshot()
	if d := diff(t, before, after); d != "" {
		t.Errorf("host network not byte-identical after cluster-down:\n%s", d)
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), " "+dir) {
		t.Errorf("mounts under %s remain", dir)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after --purge", dir)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "strata-test") {
		t.Errorf("netns remains: %s", out)
	}
	if m, _ := filepath.Glob("/sys/fs/cgroup/*/strata-cluster-test"); len(m) > 0 {
		t.Errorf("cgroups remain: %v", m)
	}
}
