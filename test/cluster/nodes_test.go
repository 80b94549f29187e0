//go:build cluster

package cluster

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestClusterThreeNodes brings up `NODES=3 hack/cluster-up` and checks what
// makes the three nodes nodes: all three Ready with their own addresses; a pod
// on each (pinned with nodeName) whose emptyDir and hostPath land in that
// node's private kubelet dir and nowhere else; a Bidirectional mount made by
// a pod that its node sees and neither the host nor another node does; pod to
// pod traffic across every pair of nodes; the service VIP from every node's
// pods and from the node itself (hostNetwork); a server on REGISTRY_ADDR from
// every node and pod, and one on the control plane's 127.0.0.1 from every
// node's 127.0.0.1; a kubelet restarted over its
// node's ssh, as the e2e suite does, back in its node. Then cluster-down, after which
// the host's network and mount table are byte-identical to before.
//
// It takes about a minute with the binaries cached (make cluster-test runs
// it; make test does not).
func TestClusterThreeNodes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: the cluster mounts, and makes network and mount namespaces")
	}
	const nodes = 3
	root := repoRoot(t)
	dir := os.Getenv("STRATA_CLUSTER_DIR")
	if dir == "" {
		dir = "/tmp/strata-cluster-test"
	}
	dir += "-3nodes"
	env := append(os.Environ(),
		"CLUSTER_DIR="+dir,
		"CLUSTER_NETNS=strata-test3",
		"CGROUP_ROOT=strata-cluster-test3",
		"POD_CIDR=10.91.0.0/24",
		"NODES="+strconv.Itoa(nodes),
	)
	c := &cluster{t: t, root: root, dir: dir, env: env}
	up := filepath.Join(root, "hack", "cluster-up")
	down := filepath.Join(root, "hack", "cluster-down")
	c.must(up, "--deps-only")
	c.must(up, "--build-only")

	before := c.snapshot()
	mountsBefore := mountTable(t)
	hostPathsBefore := existing(nodePrivatePaths)
	tornDown := false
	t.Cleanup(func() {
		if !tornDown {
			if out, err := c.run(down, "--purge"); err != nil {
				t.Errorf("cleanup cluster-down: %v\n%s", err, out)
			}
		}
	})

	freeBefore := freeMiB(t)
	start := time.Now()
	out := c.must(up)
	t.Logf("NODES=%d cluster-up to %d nodes Ready + default ServiceAccount: %.1f s", nodes, nodes, time.Since(start).Seconds())
	t.Logf("cluster-up output:\n%s", out)
	start = time.Now()
	c.must(up)
	t.Logf("cluster-up again: %.1f s", time.Since(start).Seconds())

	cenv := readEnv(t, filepath.Join(dir, "env"))
	names := strings.Fields(cenv["NODE_NAMES"])
	ips := strings.Fields(cenv["NODE_IPS"])
	cidrs := strings.Fields(cenv["POD_CIDRS"])
	if len(names) != nodes || len(ips) != nodes || len(cidrs) != nodes {
		t.Fatalf("env file: NODE_NAMES %q NODE_IPS %q POD_CIDRS %q, want %d of each", names, ips, cidrs, nodes)
	}
	kubeletDir, nodesDir := cenv["KUBELET_DIR"], cenv["CLUSTER_NODES_DIR"]

	got := c.kubectl("get", "nodes", "-o", `jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}`)
	t.Logf("nodes:\n%s", got)
	for i, n := range names {
		if want := n + " True " + ips[i]; !strings.Contains(got+"\n", want+"\n") {
			t.Errorf("node %s: want %q in kubectl get nodes", n, want)
		}
	}

	// Memory: each node's kubelet and containerd, and the machine's.
	time.Sleep(5 * time.Second) // let the kubelets settle after Ready
	var perNode []string
	for _, n := range names {
		k, ctrd := rssKiB(t, dir, "kubelet@"+n), rssKiB(t, dir, "containerd@"+n)
		perNode = append(perNode, fmt.Sprintf("%s: kubelet %d MiB + containerd %d MiB", n, k/1024, ctrd/1024))
	}
	t.Logf("RSS per node: %s; free -m used: %d MiB before cluster-up, %d MiB with %d nodes Ready",
		strings.Join(perNode, "; "), freeBefore, freeMiB(t), nodes)

	if d := diff(t, network(before), network(c.snapshot())); d != "" {
		t.Errorf("host network changed while the cluster runs:\n%s", d)
	}
	// The nodes' private mounts are in their own mount namespaces: the host
	// sees none at the paths the nodes own.
	for _, l := range strings.Split(mountTable(t), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		for _, p := range append([]string{kubeletDir, cenv["STATE_DIR"]}, nodePrivatePaths...) {
			if f[4] == p || strings.HasPrefix(f[4], p+"/") {
				t.Errorf("host mount table has a node's mount: %s", l)
			}
		}
	}

	// A pod on each node.
	busybox := cenv["BUSYBOX_IMAGE"]
	var manifest strings.Builder
	for i, n := range names {
		fmt.Fprintf(&manifest, `---
apiVersion: v1
kind: Pod
metadata:
  name: node-%[1]d
  namespace: default
spec:
  nodeName: %[2]s
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: %[3]s
    imagePullPolicy: Never
    securityContext: {privileged: true}
    env:
    - name: NODE
      valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
    command: ["/bin/sh", "-c"]
    args:
    - echo $NODE > /scratch/who && echo $NODE > /kubelet-test/who &&
      mkdir -p /kubelet/strata-test-prop && mount -t tmpfs strata-prop-$NODE /kubelet/strata-test-prop &&
      echo $NODE > /kubelet/strata-test-prop/who &&
      exec nc -ll -p 8080 -e /bin/echo "hello from $NODE"
    volumeMounts:
    - {name: scratch, mountPath: /scratch}
    - {name: test, mountPath: /kubelet-test}
    - {name: kubelet, mountPath: /kubelet, mountPropagation: Bidirectional}
  volumes:
  - name: scratch
    emptyDir: {}
  - name: test
    hostPath: {path: %[4]s/strata-test, type: DirectoryOrCreate}
  - name: kubelet
    hostPath: {path: %[4]s, type: Directory}
---
apiVersion: v1
kind: Pod
metadata:
  name: hostnet-%[1]d
  namespace: default
spec:
  nodeName: %[2]s
  hostNetwork: true
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: busybox
    image: %[3]s
    imagePullPolicy: Never
    command: ["/bin/sh", "-c"]
    args: ["ip -4 addr; echo | nc -w 3 10.96.0.1 443 && echo service-vip-reachable"]
`, i+1, n, busybox, kubeletDir)
	}
	podFile := filepath.Join(t.TempDir(), "pods.yaml")
	if err := os.WriteFile(podFile, []byte(manifest.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	c.kubectl("apply", "-f", podFile)
	for i := range names {
		c.waitPod(fmt.Sprintf("node-%d", i+1), "Running")
		c.waitPod(fmt.Sprintf("hostnet-%d", i+1), "Succeeded")
	}
	t.Logf("%d pods on %d nodes apply -> Running/Succeeded: %.1f s", 2*nodes, nodes, time.Since(start).Seconds())

	podIPs := make([]string, nodes)
	for i, n := range names {
		pod := fmt.Sprintf("node-%d", i+1)
		podIPs[i] = c.kubectl("get", "pod", pod, "-o", "jsonpath={.status.podIP}")
		if prefix := strings.TrimSuffix(cidrs[i], "0/24"); !strings.HasPrefix(podIPs[i], prefix) {
			t.Errorf("pod %s on %s has IP %q, not in the node's pod CIDR %s", pod, n, podIPs[i], cidrs[i])
		}
		if logs := c.kubectl("logs", fmt.Sprintf("hostnet-%d", i+1)); !strings.Contains(logs, "service-vip-reachable") ||
			!strings.Contains(logs, ips[i]+"/24") {
			t.Errorf("hostNetwork pod on %s: want the node's address %s and the service VIP reachable; output:\n%s", n, ips[i], logs)
		}
	}
	t.Logf("pod IPs: %v", podIPs)

	// Pod to pod across nodes, every ordered pair; the service VIP from
	// every node's pods.
	for i := range names {
		pod := fmt.Sprintf("node-%d", i+1)
		for j, m := range names {
			if i == j {
				continue
			}
			out, err := c.run(filepath.Join(dir, "bin", "kubectl"), "exec", pod, "--", "nc", "-w", "3", podIPs[j], "8080")
			if want := "hello from " + m; err != nil || !strings.Contains(out, want) {
				t.Errorf("%s (on %s) -> %s:8080 (on %s): want %q, got %q (%v)", pod, names[i], podIPs[j], m, want, out, err)
			}
		}
		out, err := c.run(filepath.Join(dir, "bin", "kubectl"), "exec", pod, "--", "sh", "-c",
			"echo | nc -w 3 10.96.0.1 443 && echo service-vip-reachable")
		if err != nil || !strings.Contains(out, "service-vip-reachable") {
			t.Errorf("%s on %s: service VIP 10.96.0.1:443 unreachable: %q (%v)", pod, names[i], out, err)
		}
	}

	// A server in the control plane's namespace on REGISTRY_ADDR (where the
	// tests run their registry) answers every node and every node's pods.
	www := t.TempDir()
	if err := os.WriteFile(filepath.Join(www, "marker"), []byte(marker+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// And one on 127.0.0.1:5009 there (where the e2e suite runs its
	// registries) answers on every node's own 127.0.0.1:5009, for its
	// containerd and hostNetwork pods.
	const local = "127.0.0.1:5009"
	var httpds []*exec.Cmd
	for _, addr := range []string{cenv["REGISTRY_ADDR"], local} {
		httpd := exec.Command(filepath.Join(dir, "bin", "in-netns"), "busybox", "httpd", "-f", "-p", addr, "-h", www)
		if err := httpd.Start(); err != nil {
			t.Fatal(err)
		}
		httpds = append(httpds, httpd)
	}
	stopHTTPD := func() {
		for _, h := range httpds {
			if h.ProcessState == nil {
				h.Process.Kill()
				h.Wait()
			}
		}
	}
	t.Cleanup(stopHTTPD)
	time.Sleep(300 * time.Millisecond)
	url, localURL := "http://"+cenv["REGISTRY_ADDR"]+"/marker", "http://"+local+"/marker"
	for i, n := range names {
		for _, u := range []string{url, localURL} {
			if out, err := c.run(filepath.Join(dir, "bin", "in-node"), strconv.Itoa(i+1), "busybox", "wget", "-qO-", u); err != nil || strings.TrimSpace(out) != marker {
				t.Errorf("node %s: wget %s: %q (%v)", n, u, out, err)
			}
		}
		if out, err := c.run(filepath.Join(dir, "bin", "kubectl"), "exec", fmt.Sprintf("node-%d", i+1), "--", "wget", "-qO-", url); err != nil || strings.TrimSpace(out) != marker {
			t.Errorf("pod on %s: wget %s: %q (%v)", n, url, out, err)
		}
	}
	stopHTTPD() // nothing of the test's may hold the namespace at cluster-down

	// in-node all: on every node.
	if out := c.must(filepath.Join(dir, "bin", "in-node"), "all", "sh", "-c", "echo $NODE_NAME"); out != strings.Join(names, "\n")+"\n" {
		t.Errorf("in-node all: %q, want the nodes' names in order", out)
	}

	// Each node's kubelet dir is its own.
	inNode := filepath.Join(dir, "bin", "in-node")
	for i, n := range names {
		own := filepath.Join(nodesDir, n, "kubelet")
		if b, err := os.ReadFile(filepath.Join(own, "strata-test", "who")); err != nil || strings.TrimSpace(string(b)) != n {
			t.Errorf("hostPath of the pod on %s: %s/strata-test/who = %q (%v), want %q", n, own, b, err, n)
		}
		ed, _ := filepath.Glob(filepath.Join(own, "pods", "*", "volumes", "kubernetes.io~empty-dir", "scratch", "who"))
		if len(ed) != 1 {
			t.Errorf("emptyDir of the pod on %s: want one in %s/pods, found %v", n, own, ed)
		} else if b, _ := os.ReadFile(ed[0]); strings.TrimSpace(string(b)) != n {
			t.Errorf("emptyDir of the pod on %s: %s = %q", n, ed[0], b)
		}
		// The Bidirectional mount reached the node (its kubelet's view)...
		out := c.must(inNode, strconv.Itoa(i+1), "sh", "-c",
			"cat "+kubeletDir+"/strata-test-prop/who; grep -o 'strata-prop-[a-z0-9-]*' /proc/self/mountinfo")
		if want := n + "\nstrata-prop-" + n + "\n"; out != want {
			t.Errorf("in-node %d: want the pod's Bidirectional mount and only it, %q; got %q", i+1, want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(kubeletDir, "strata-test")); !os.IsNotExist(err) {
		t.Errorf("the pods' hostPath appeared on the host at %s/strata-test (%v)", kubeletDir, err)
	}
	// ... and neither the host nor another node.
	if strings.Contains(mountTable(t), "strata-prop-") {
		t.Errorf("a pod's Bidirectional mount reached the host's mount table")
	}
	// Nodes 1 and 2 unmount theirs; node 3's is left for cluster-down, which
	// unmounts what is left inside each node (and fails if it cannot).
	for i := range names[:len(names)-1] {
		c.must(inNode, strconv.Itoa(i+1), "umount", kubeletDir+"/strata-test-prop")
	}

	// The e2e suite's [Disruptive] specs restart a kubelet over ssh: node 2's
	// sshd restarts node 2's kubelet, which comes back in node 2's mount
	// namespace.
	out = c.must(filepath.Join(dir, "bin", "in-netns"), "ssh", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", cenv["KUBE_SSH_KEY"],
		"root@"+ips[1], "systemctl restart kubelet && systemctl is-active kubelet")
	if l := strings.Split(strings.TrimSpace(out), "\n"); l[len(l)-1] != "active" { // the lines before: service's log
		t.Errorf("ssh %s systemctl restart kubelet: %q", ips[1], out)
	}
	if k, ctrd := mntNS(t, dir, "kubelet@"+names[1]), mntNS(t, dir, "containerd@"+names[1]); k != ctrd {
		t.Errorf("kubelet restarted over ssh runs in mount namespace %s, its containerd in %s", k, ctrd)
	}

	c.kubectl("delete", "pods", "--all", "--wait=true", "--timeout=60s")

	start = time.Now()
	out = c.must(down, "--purge")
	tornDown = true
	t.Logf("cluster-down --purge: %.1f s\n%s", time.Since(start).Seconds(), out)

	if d := diff(t, before, c.snapshot()); d != "" {
		t.Errorf("host network not byte-identical after cluster-down:\n%s", d)
	}
	if d := diff(t, mountsBefore, mountTable(t)); d != "" {
		t.Errorf("host mount table not byte-identical after cluster-down:\n%s", d)
	}
	if got := existing(nodePrivatePaths); strings.Join(got, " ") != strings.Join(hostPathsBefore, " ") {
		t.Errorf("host paths: %v existed before cluster-up, %v after cluster-down", hostPathsBefore, got)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after --purge", dir)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "strata-test3") {
		t.Errorf("netns remains: %s", out)
	}
	if m, _ := filepath.Glob("/sys/fs/cgroup/*/strata-cluster-test3"); len(m) > 0 {
		t.Errorf("cgroups remain: %v", m)
	}
}

// nodePrivatePaths are the host paths that every node of a many-node cluster
// has its own copy of (hack/cluster/common.sh NODE_PRIVATE_PATHS).
var nodePrivatePaths = []string{"/var/lib/kubelet", "/var/lib/cni", "/run/containerd", "/var/log/containers", "/etc/cni"}

func existing(paths []string) []string {
	var out []string
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func mountTable(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// readEnv reads the export lines of cluster-up's env file.
func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(strings.TrimPrefix(s.Text(), "export "), "=")
		if ok && !strings.HasPrefix(k, "#") {
			env[k] = strings.Trim(v, `"`)
		}
	}
	return env
}

// rssKiB is the resident memory of the component whose pidfile cluster-up wrote.
func rssKiB(t *testing.T, dir, name string) int {
	t.Helper()
	pid, err := os.ReadFile(filepath.Join(dir, "run", name+".pid"))
	if err != nil {
		t.Fatalf("pidfile of %s: %v", name, err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", strings.TrimSpace(string(pid)), "status"))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("%s: no VmRSS", name)
	return 0
}

// mntNS is the mount namespace of the component whose pidfile cluster-up wrote.
func mntNS(t *testing.T, dir, name string) string {
	t.Helper()
	pid, err := os.ReadFile(filepath.Join(dir, "run", name+".pid"))
	if err != nil {
		t.Fatalf("pidfile of %s: %v", name, err)
	}
	ns, err := os.Readlink(filepath.Join("/proc", strings.TrimSpace(string(pid)), "ns", "mnt"))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return ns
}

// freeMiB is the "used" column of free -m.
func freeMiB(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("free", "-m").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[0] == "Mem:" {
			n, _ := strconv.Atoi(f[2])
			return n
		}
	}
	t.Fatalf("free -m: %s", out)
	return 0
}

// waitPod waits up to 2 minutes for a pod to reach phase want.
func (c *cluster) waitPod(name, want string) {
	c.t.Helper()
	var phase string
	for deadline := time.Now().Add(120 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		phase = c.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}")
		if phase == want || phase == "Failed" || (phase == "Succeeded" && want != phase) {
			break
		}
	}
	if phase != want {
		out, _ := c.run(filepath.Join(c.dir, "bin", "kubectl"), "describe", "pod", name)
		logs, _ := c.run(filepath.Join(c.dir, "bin", "kubectl"), "logs", name)
		c.t.Fatalf("pod %s: phase %q, want %q\n%s\nlogs:\n%s", name, phase, want, out, logs)
	}
}
