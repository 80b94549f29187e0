//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	csitest "github.com/strata-csi/strata/test/csi"
)

const (
	driverName = "strata.csi.dev"
	release    = "strata"
	releaseNS  = "strata-system"
	// The chart's default namespace of the driver's pull secrets
	// (registries.pullSecretsServiceAccount.namespace).
	pullSecretsNS = "strata-pull-secrets"
	// The busybox image of the Kubernetes e2e suite, under its exact name
	// (hack/e2e tags the cluster's local busybox with it): the examples in
	// deploy/examples and the e2e suite's pods use it.
	busybox = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
	// The registry runs inside the cluster's network namespace on its
	// loopback: the plugin (hostNetwork) reaches it there over plain HTTP.
	registryAddr = "127.0.0.1:5000"
	// What deploy/examples name as the dataset image.
	examplePlaceholder = "registry.local:5000/datasets/sample:v1"
)

// cluster is what hack/cluster-up wrote to its env file, plus the plugin
// image and the e2e-storage.test binary that hack/e2e prepared.
type cluster struct {
	dir, netns, kubeconfig, kubeletDir, stateDir, nodeName, k8sVersion string
	kubectlBin, ctrBin                                                 string
	// sshKey is the key of the cluster's sshd, which the suite's
	// [Disruptive] specs use to restart the kubelet (make conformance).
	sshKey                                     string
	pluginImage, e2eTest, e2eBuild, helm, repo string
	// nodes are the cluster's nodes in order (hack/cluster-up's NODES):
	// with one, its dirs are kubeletDir and stateDir above.
	nodes []node
}

// node is one of the cluster's nodes, with the host paths of what it holds
// privately: with many nodes, its kubelet dir and state dir are under
// CLUSTER_NODES_DIR/<name> on the host, and its mounts are seen only in its
// own mount namespace.
type node struct {
	name, ip             string
	kubeletDir, stateDir string // host paths
	mntns                string // its mount namespace's file; "" with one node (the host's)
}

var (
	c    cluster
	kube *kubernetes.Clientset
)

func TestMain(m *testing.M) {
	if err := setup(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e setup: %v\n", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func setup() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the e2e tests need root (they read the node's mount table and state dir)")
	}
	envFile := os.Getenv("STRATA_E2E_CLUSTER_ENV")
	if envFile == "" {
		return fmt.Errorf("STRATA_E2E_CLUSTER_ENV is not set: run the suite with `make e2e` (hack/e2e), which brings the cluster up and prepares the images")
	}
	vars, err := readEnvFile(envFile)
	if err != nil {
		return err
	}
	get := func(k string) string { return vars[k] }
	c = cluster{
		dir: get("CLUSTER_DIR"), netns: get("CLUSTER_NETNS"), kubeconfig: get("KUBECONFIG"),
		kubeletDir: get("KUBELET_DIR"), stateDir: get("STATE_DIR"), nodeName: get("NODE_NAME"),
		k8sVersion: get("K8S_VERSION"), sshKey: get("KUBE_SSH_KEY"),
		pluginImage: os.Getenv("STRATA_E2E_IMAGE"), e2eTest: os.Getenv("STRATA_E2E_TEST_BIN"),
		e2eBuild: os.Getenv("STRATA_E2E_TEST_BUILD"), helm: os.Getenv("HELM"),
	}
	c.kubectlBin = filepath.Join(c.dir, "bin", "kubectl")
	c.ctrBin = filepath.Join(c.dir, "bin", "ctr")
	need := map[string]string{"CLUSTER_DIR": c.dir, "CLUSTER_NETNS": c.netns, "KUBECONFIG": c.kubeconfig,
		"KUBELET_DIR": c.kubeletDir, "STATE_DIR": c.stateDir, "NODE_NAME": c.nodeName,
		"STRATA_E2E_IMAGE": c.pluginImage, "HELM": c.helm}
	if n := get("NODES"); n == "" || n == "1" {
		// The external-storage suite runs on one node only (TestStrata).
		need["STRATA_E2E_TEST_BIN or STRATA_E2E_TEST_BUILD"] = c.e2eTest + c.e2eBuild
		c.nodes = []node{{name: c.nodeName, ip: get("NODE_IP"), kubeletDir: c.kubeletDir, stateDir: c.stateDir}}
	} else {
		names, ips := strings.Fields(get("NODE_NAMES")), strings.Fields(get("NODE_IPS"))
		if fmt.Sprint(len(names)) != n || len(ips) != len(names) || get("CLUSTER_NODES_DIR") == "" {
			return fmt.Errorf("cluster env %s: NODES=%s, but NODE_NAMES %q, NODE_IPS %q, CLUSTER_NODES_DIR %q", envFile, n, names, ips, get("CLUSTER_NODES_DIR"))
		}
		for i, name := range names {
			dir := filepath.Join(get("CLUSTER_NODES_DIR"), name)
			c.nodes = append(c.nodes, node{name: name, ip: ips[i],
				kubeletDir: filepath.Join(dir, "kubelet"), stateDir: filepath.Join(dir, "strata"),
				mntns: filepath.Join(get("CLUSTER_MNTNS_DIR"), name)})
		}
		need["CLUSTER_MNTNS_DIR"] = get("CLUSTER_MNTNS_DIR")
	}
	for k, v := range need {
		if v == "" {
			return fmt.Errorf("%s is not set (cluster env %s, or hack/e2e)", k, envFile)
		}
	}
	_, file, _, _ := runtime.Caller(0)
	c.repo = filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))

	rc, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	// The apiserver listens only inside the cluster's network namespace.
	rc.Dial = netnsDialer(c.netns)
	rc.QPS, rc.Burst = 50, 100
	if kube, err = kubernetes.NewForConfig(rc); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := kube.CoreV1().Nodes().Get(ctx, c.nodeName, metav1.GetOptions{}); err != nil {
		return fmt.Errorf("node %s: %w (is the cluster up? hack/cluster-up)", c.nodeName, err)
	}
	return nil
}

// readEnvFile parses the `export K=V` lines of hack/cluster-up's env file.
func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cluster env: %w", err)
	}
	defer f.Close()
	vars := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimPrefix(strings.TrimSpace(sc.Text()), "export ")
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(k, "#") {
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1] // NODE_NAMES="a b c"
			}
			vars[k] = v
		}
	}
	return vars, sc.Err()
}

// inNetns runs fn on an OS thread that has joined network namespace ns.
// Sockets that fn creates belong to that namespace for their whole life. The
// thread is never unlocked, so Go discards it when the goroutine ends
// instead of reusing a thread in the wrong namespace.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			errc <- fmt.Errorf("network namespace %s: %w", ns, err)
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func netnsDialer(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := inNetns(ns, func() error {
			var err error
			conn, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}
}

// netnsTransport is an HTTP transport whose connections are made inside the
// cluster's network namespace.
func netnsTransport() http.RoundTripper {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.DialContext = netnsDialer(c.netns)
	return tr
}

// run runs a command and returns its combined output.
func run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
	err := cmd.Run()
	return out.String(), err
}

func kubectl(args ...string) (string, error) { return run(c.kubectlBin, args...) }

// kubectlStdin runs kubectl with manifest on stdin (kubectl apply -f -).
func kubectlStdin(manifest string, args ...string) (string, error) {
	cmd := exec.Command(c.kubectlBin, args...)
	cmd.Stdin = strings.NewReader(manifest)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// helm runs helm inside the cluster's network namespace (it only talks to
// the apiserver; it mounts nothing).
func helm(args ...string) (string, error) {
	return run("ip", append([]string{"netns", "exec", c.netns, c.helm, "--kubeconfig", c.kubeconfig}, args...)...)
}

// exec runs sh -c script in a pod's first container.
func podExec(ns, pod, script string) (string, error) {
	return kubectl("-n", ns, "exec", pod, "--", "sh", "-c", script)
}

func mustExec(t *testing.T, ns, pod, script string) string {
	t.Helper()
	out, err := podExec(ns, pod, script)
	if err != nil {
		t.Fatalf("exec in %s/%s: %q: %v\n%s", ns, pod, script, err, out)
	}
	return out
}

// eventually polls cond every 250 ms until it returns true or timeout
// passes; the last error it returned explains a timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last: %v)", what, timeout, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func ctx(t *testing.T) context.Context {
	cx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return cx
}

// namespace creates a namespace for one scenario and deletes it (waiting
// until it is gone) when the scenario ends.
func namespace(t *testing.T, name string) string {
	t.Helper()
	_, err := kube.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() { deleteNamespace(t, name) })
	return name
}

func deleteNamespace(t *testing.T, name string) {
	t.Helper()
	// Pods first, with a one-second grace period: the examples' sleep
	// ignores SIGTERM and would hold the namespace for the default 30 s. Not
	// zero, which would remove the pods from the API before kubelet has
	// unpublished their volumes.
	one := int64(1)
	err := kube.CoreV1().Pods(name).DeleteCollection(context.Background(), metav1.DeleteOptions{GracePeriodSeconds: &one}, metav1.ListOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Errorf("delete pods of namespace %s: %v", name, err)
	}
	err = kube.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return
	}
	if err != nil {
		t.Errorf("delete namespace %s: %v", name, err)
		return
	}
	eventually(t, 2*time.Minute, "namespace "+name+" deleted", func() (bool, error) {
		_, err := kube.CoreV1().Namespaces().Get(context.Background(), name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), err
	})
}

// waitRunning waits until every container of the pod is ready, and dumps
// what explains a failure (pod, events, plugin log).
func waitRunning(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p, err := kube.CoreV1().Pods(ns).Get(ctx(t), name, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning && podReady(p) {
			return p
		}
		if err == nil {
			pod = p
		}
		if time.Now().After(deadline) {
			phase := corev1.PodPhase("unknown")
			if pod != nil {
				phase = pod.Status.Phase
			}
			dumpPod(t, ns, name)
			t.Fatalf("pod %s/%s not running and ready within 2m (phase %s, last error %v)", ns, name, phase, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func podReady(p *corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

func dumpPod(t *testing.T, ns, name string) {
	t.Helper()
	out, _ := kubectl("-n", ns, "describe", "pod", name)
	t.Logf("kubectl describe pod %s/%s:\n%s", ns, name, out)
	out, _ = kubectl("-n", releaseNS, "logs", "-l", "app.kubernetes.io/component=node", "--tail=60")
	t.Logf("plugin log (tail):\n%s", out)
}

// deletePod deletes a pod and waits until it is gone from the API, which is
// after kubelet has unpublished its volumes. The grace period is one second,
// not zero: a zero grace period removes the pod from the API at once and
// leaves kubelet to clean up later.
func deletePod(t *testing.T, ns, name string) {
	t.Helper()
	one := int64(1)
	if err := kube.CoreV1().Pods(ns).Delete(ctx(t), name, metav1.DeleteOptions{GracePeriodSeconds: &one}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatalf("delete pod %s/%s: %v", ns, name, err)
	}
	eventually(t, 2*time.Minute, "pod "+ns+"/"+name+" gone", func() (bool, error) {
		_, err := kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), err
	})
}

// volumePath is where kubelet has a pod's CSI volume mounted on the node.
func volumePath(p *corev1.Pod, volume string) string {
	return filepath.Join(c.kubeletDir, "pods", string(p.UID), "volumes", "kubernetes.io~csi", volume, "mount")
}

// overlaysUnder lists the overlay mounts at or below dir on the node.
func overlaysUnder(t *testing.T, dir string) []csitest.Mount {
	t.Helper()
	ms, err := csitest.MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []csitest.Mount
	for _, m := range ms {
		if m.FsType == "overlay" {
			out = append(out, m)
		}
	}
	return out
}

// record is the part of the plugin's volume.json (under
// <state>/volumes/<key>/) that the tests look at.
type record struct {
	VolumeID   string   `json:"volumeID"`
	TargetPath string   `json:"targetPath"`
	Image      string   `json:"image"`
	ReadOnly   bool     `json:"readOnly"`
	Layers     []string `json:"layers"`
	dir        string
}

// records reads every publish the plugin has on disk.
func records(t *testing.T) []record {
	t.Helper()
	dirs, err := filepath.Glob(filepath.Join(c.stateDir, "volumes", "*"))
	if err != nil {
		t.Fatal(err)
	}
	var out []record
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "volume.json"))
		if err != nil {
			t.Errorf("volume dir %s without a readable volume.json: %v", d, err)
			continue
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil {
			t.Errorf("%s/volume.json: %v", d, err)
			continue
		}
		r.dir = d
		out = append(out, r)
	}
	return out
}

// recordFor returns the plugin's record of the publish at target.
func recordFor(t *testing.T, target string) record {
	t.Helper()
	for _, r := range records(t) {
		if r.TargetPath == target {
			return r
		}
	}
	t.Fatalf("the plugin has no volume record for %s", target)
	return record{}
}

// cachedLayers lists the diffIDs in the node's layer cache.
func cachedLayers(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(c.stateDir, "layers", "sha256"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, "sha256:"+e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// strataCLI runs the strata CLI from the plugin image's build (bin/strata)
// against the node's state dir.
func strataCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := run(filepath.Join(c.repo, "bin", "strata"), append([]string{"--root", c.stateDir}, args...)...)
	if err != nil {
		t.Fatalf("strata %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// pluginPod returns the running node plugin pod (of the cluster's first
// node).
func pluginPod(t *testing.T) *corev1.Pod { return pluginPodOn(t, c.nodeName) }

// pluginPodOn returns the running, ready plugin pod on the node.
func pluginPodOn(t *testing.T, nodeName string) *corev1.Pod {
	t.Helper()
	pods, err := kube.CoreV1().Pods(releaseNS).List(ctx(t), metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/component=node", FieldSelector: "spec.nodeName=" + nodeName})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && podReady(p) {
			return p
		}
	}
	t.Fatalf("no ready plugin pod on node %s (%d pods)", nodeName, len(pods.Items))
	return nil
}

// waitPluginReady waits until the DaemonSet has one ready pod on each node
// and every node's kubelet has the driver registered in its CSINode.
func waitPluginReady(t *testing.T) {
	t.Helper()
	eventually(t, 2*time.Minute, "a plugin pod ready on every node and registered with its kubelet", func() (bool, error) {
		pods, err := kube.CoreV1().Pods(releaseNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
		if err != nil {
			return false, err
		}
		ready := map[string]int{}
		for i := range pods.Items {
			if p := &pods.Items[i]; p.DeletionTimestamp == nil && podReady(p) {
				ready[p.Spec.NodeName]++
			}
		}
		for _, n := range c.nodes {
			if ready[n.name] != 1 {
				return false, fmt.Errorf("%d plugin pods, ready per node %v", len(pods.Items), ready)
			}
		}
		if len(pods.Items) != len(c.nodes) {
			return false, fmt.Errorf("%d plugin pods for %d nodes", len(pods.Items), len(c.nodes))
		}
		for _, n := range c.nodes {
			if ok, err := csiNodeHasDriver(n.name); !ok {
				return false, err
			}
		}
		return true, nil
	})
}

func csiNodeHasDriver(nodeName string) (bool, error) {
	cn, err := kube.StorageV1().CSINodes().Get(context.Background(), nodeName, metav1.GetOptions{})
	if err != nil {
		return false, err
	}
	for _, d := range cn.Spec.Drivers {
		if d.Name == driverName {
			return true, nil
		}
	}
	return false, fmt.Errorf("CSINode %s lists no %s", nodeName, driverName)
}

// example reads a manifest from deploy/examples with the dataset image in
// place of the placeholder.
func example(t *testing.T, file, image string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.repo, "deploy", "examples", file))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(examplePlaceholder)) {
		t.Fatalf("deploy/examples/%s does not name the placeholder image %s", file, examplePlaceholder)
	}
	return strings.ReplaceAll(string(b), examplePlaceholder, image)
}

// testPod is a pod that sleeps with an inline Strata volume of image at
// /data; the other fields are optional.
type testPod struct {
	name, image    string
	readOnly       bool
	secret         string // nodePublishSecretRef
	policy         string // pullPolicy attribute
	serviceAccount string
	stackImages    string // stackImages attribute: images above image, bottom first
}

func (p testPod) manifest() string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\nspec:\n", p.name)
	if p.serviceAccount != "" {
		fmt.Fprintf(&b, "  serviceAccountName: %s\n", p.serviceAccount)
	}
	fmt.Fprintf(&b, `  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: %s
    command: ["sleep", "86400"]
    volumeMounts:
    - name: dataset
      mountPath: /data
  volumes:
  - name: dataset
    csi:
      driver: %s
      readOnly: %t
      volumeAttributes:
        image: %s
`, busybox, driverName, p.readOnly, p.image)
	if p.policy != "" {
		fmt.Fprintf(&b, "        pullPolicy: %s\n", p.policy)
	}
	if p.stackImages != "" {
		fmt.Fprintf(&b, "        stackImages: %q\n", p.stackImages)
	}
	if p.secret != "" {
		fmt.Fprintf(&b, "      nodePublishSecretRef:\n        name: %s\n", p.secret)
	}
	return b.String()
}

func chartDir() string { return filepath.Join(c.repo, "charts", "strata") }

func apply(t *testing.T, ns, manifest string) {
	t.Helper()
	if out, err := kubectlStdin(manifest, "-n", ns, "apply", "-f", "-"); err != nil {
		t.Fatalf("kubectl apply: %v\n%s\n--- manifest:\n%s", err, out, manifest)
	}
}
