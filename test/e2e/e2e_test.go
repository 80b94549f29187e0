//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// The dataset image that every scenario mounts: two layers, the second of
// which adds a file and deletes one of the first (a whiteout), so the pods
// see the merged view.
var (
	datasetRef    = registryAddr + "/e2e/dataset:v1"
	missingRef    = registryAddr + "/e2e/dataset:v0" // a tag the registry lacks
	datasetLayers []string                           // diffIDs, bottom first
	datasetBlobs  []string                           // the layers' (compressed) digests, bottom first
	// conformanceRef is the image of the external suite's classes: the
	// suite writes files of fixed names at the volume's root (data,
	// index.html), which the dataset's data/ directory would be in the way
	// of, so its one file has a name no spec writes.
	conformanceRef = registryAddr + "/e2e/conformance:v1"
)

// TestStrata runs the scenarios in order on one installation of the chart:
// each scenario uses its own namespace and leaves nothing behind, and the
// last one upgrades and uninstalls the chart.
func TestStrata(t *testing.T) {
	steps := []struct {
		name string
		fn   func(*testing.T)
	}{
		{"Install", testInstall},
		{"InlineVolume", testInlineVolume},
		{"TwoPodsOneImage", testTwoPodsOneImage},
		{"StaticPVDeployment", testStaticPVDeployment},
		{"ReadOnlyVolume", testReadOnlyVolume},
		{"SubPathVolume", testSubPathVolume},
		{"StackedVolume", testStackedVolume},
		{"ModelVolumes", testModelVolumes},
		{"CloneStatefulSet", testCloneStatefulSet},
		{"GenericEphemeralClone", testGenericEphemeralClone},
		{"CloneCapacity", testCloneCapacity},
		{"CloneExpand", testCloneExpand},
		{"VolumeCommit", testVolumeCommit},
		{"ModelFineTune", testModelFineTune},
		{"PodDeletionUnpublishes", testPodDeletionUnpublishes},
		{"PluginRestart", testPluginRestart},
		{"MissingImage", testMissingImage},
		{"PrivateRegistry", testPrivateRegistry},
		{"PodIdentity", testPodIdentity},
		{"TenantIsolation", testTenantIsolation},
		{"ExternalStorageSuite", testExternalStorageSuite},
		{"HelmUpgradeUninstall", testHelmUpgradeUninstall},
	}
	for i, s := range steps {
		if !t.Run(s.name, s.fn) && i == 0 {
			t.Fatal("install failed: the other scenarios need the driver")
		}
	}
}

// testInstall starts the registry inside the cluster's network namespace,
// pushes the dataset image and installs the chart.
func testInstall(t *testing.T) {
	startRegistry(t, registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	pushImages(t)
	installChart(t)
}

// startRegistry serves h as the registry at registryAddr inside the
// cluster's network namespace, until the test binary exits: every scenario
// and the external suite pull from it.
func startRegistry(t *testing.T, h http.Handler) {
	t.Helper()
	serveInNetns(t, registryAddr, h)
}

// pushImages pushes the dataset and the external suite's image, and notes
// the dataset's layers.
func pushImages(t *testing.T) {
	t.Helper()
	base := testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("data"),
		testimage.File("data/README", "dataset v1\n"),
		testimage.Dir("data/raw"),
		testimage.File("data/raw/a.txt", "alpha\n"),
		testimage.File("data/raw/b.txt", "beta\n"),
	), testimage.Gzip)
	top := testimage.Layer(t, testimage.Tar(t,
		testimage.File("data/labels.txt", "labels\n"),
		testimage.Whiteout("data/raw/b.txt"),
	), testimage.Gzip)
	img := testimage.Image(t, base, top)
	testimage.Push(t, datasetRef, img, remote.WithTransport(netnsTransport()))
	testimage.Push(t, conformanceRef, testimage.Image(t, testimage.Layer(t,
		testimage.Tar(t, testimage.File("README.strata", "the external suite's image\n")), testimage.Gzip)),
		remote.WithTransport(netnsTransport()))
	for _, l := range []v1.Layer{base, top} {
		d, err := l.DiffID()
		if err != nil {
			t.Fatal(err)
		}
		b, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		datasetLayers = append(datasetLayers, d.String())
		datasetBlobs = append(datasetBlobs, b.String())
	}
}

// installChart installs the chart with the e2e settings and extra --set
// arguments, and waits until a plugin pod on every node is registered with
// its kubelet.
func installChart(t *testing.T, extra ...string) {
	t.Helper()
	repo, tag := splitImage(c.pluginImage)
	start := time.Now()
	args := []string{"install", release, chartDir(),
		"--namespace", releaseNS, "--create-namespace", "--wait", "--timeout", "3m",
		"--set", "image.repository=" + repo, "--set-string", "image.tag=" + tag, "--set", "image.pullPolicy=Never",
		"--set", "kubeletDir=" + c.kubeletDir, "--set", "stateDir=" + c.stateDir,
		"--set", "logLevel=4", "--set", "metrics.enabled=true", "--set", "volumeCommits.enabled=true",
		// The state dir is on the host's shared disk: the default budget,
		// half of that disk, may be more than is free, which would leave
		// the node no room for clones (docs/clones.md) and keep every
		// clone's claim Pending.
		"--set", "cache.maxBytes=4Gi"}
	out, err := helm(append(args, extra...)...)
	if err != nil {
		t.Fatalf("helm install: %v\n%s", err, out)
	}
	waitPluginReady(t)
	t.Logf("helm install -> plugin registered with kubelet on %d node(s): %.1f s", len(c.nodes), time.Since(start).Seconds())
}

func splitImage(ref string) (repo, tag string) {
	i := strings.LastIndex(ref, ":")
	if i < 0 || strings.Contains(ref[i:], "/") {
		return ref, "latest"
	}
	return ref[:i], ref[i+1:]
}

// inlinePod is a pod that mounts image as an inline ephemeral volume at
// /data and sleeps.
func inlinePod(name, image string, readOnly bool) string {
	return testPod{name: name, image: image, readOnly: readOnly}.manifest()
}

func createPod(t *testing.T, ns, manifest string) {
	t.Helper()
	apply(t, ns, manifest)
}

// checkDatasetView asserts that the pod sees the dataset's merged files.
func checkDatasetView(t *testing.T, ns, pod, dir string) {
	t.Helper()
	out := mustExec(t, ns, pod, "cat "+dir+"/data/README "+dir+"/data/raw/a.txt "+dir+"/data/labels.txt; "+
		"test -e "+dir+"/data/raw/b.txt && echo b-present || echo b-deleted")
	want := "dataset v1\nalpha\nlabels\nb-deleted\n"
	if out != want {
		t.Fatalf("%s/%s sees %q under %s, want %q", ns, pod, out, dir, want)
	}
}

// 1. An inline ephemeral volume (deploy/examples/inline.yaml): the pod reads
// the image's files and writes its own, and the write lands in the
// volume's private upper directory on the node.
func testInlineVolume(t *testing.T) {
	ns := namespace(t, "e2e-inline")
	apply(t, ns, example(t, "inline.yaml", datasetRef))
	pod := waitRunning(t, ns, "strata-inline")
	checkDatasetView(t, ns, pod.Name, "/data")
	out := mustExec(t, ns, pod.Name, "cat /data/written-by-pod.txt; echo mine > /data/data/raw/mine.txt; cat /data/data/raw/mine.txt")
	if want := "written by strata-inline\nmine\n"; out != want {
		t.Fatalf("pod's own writes read back %q, want %q", out, want)
	}

	target := volumePath(pod, "dataset")
	if ms := overlaysUnder(t, target); len(ms) != 1 || ms[0].MountPoint != target {
		t.Fatalf("overlay mounts at %s: %+v, want one", target, ms)
	}
	r := recordFor(t, target)
	if r.Image != datasetRef || r.ReadOnly || !slices.Equal(r.Layers, datasetLayers) {
		t.Errorf("volume record %+v: want image %s, read-write, layers %v", r, datasetRef, datasetLayers)
	}
	// The upper is capped (the chart's volumes.defaultUpperSize): it is in
	// the volume's own filesystem, mounted at fs/.
	b, err := os.ReadFile(filepath.Join(r.dir, "fs", "upper", "data", "raw", "mine.txt"))
	if err != nil || string(b) != "mine\n" {
		t.Errorf("the pod's write is not in its upper dir on the node: %q, %v", b, err)
	}
	// The image's own files are not copied up.
	if _, err := os.Stat(filepath.Join(r.dir, "fs", "upper", "data", "raw", "a.txt")); !os.IsNotExist(err) {
		t.Errorf("an unmodified image file was copied up: %v", err)
	}
}

// 2. Two pods of one image: each sees only its own writes, and the node
// holds each of the image's layers once.
func testTwoPodsOneImage(t *testing.T) {
	ns := namespace(t, "e2e-two")
	createPod(t, ns, inlinePod("pod-a", datasetRef, false))
	createPod(t, ns, inlinePod("pod-b", datasetRef, false))
	a, b := waitRunning(t, ns, "pod-a"), waitRunning(t, ns, "pod-b")
	mustExec(t, ns, a.Name, "echo a > /data/data/README")
	mustExec(t, ns, b.Name, "echo b > /data/only-b")
	if out := mustExec(t, ns, a.Name, "cat /data/data/README; ls /data"); out != "a\ndata\n" {
		t.Errorf("pod-a sees %q, want its own README and no only-b", out)
	}
	if out := mustExec(t, ns, b.Name, "cat /data/data/README /data/only-b"); out != "dataset v1\nb\n" {
		t.Errorf("pod-b sees %q, want the image's README and its own only-b", out)
	}

	// The inline scenario pulled the image: these two found it cached.
	podEvent(t, ns, "pod-b", "Pulled", datasetRef, "already cached")
	ra, rb := recordFor(t, volumePath(a, "dataset")), recordFor(t, volumePath(b, "dataset"))
	if ra.dir == rb.dir {
		t.Fatalf("both pods share one volume dir %s", ra.dir)
	}
	if !slices.Equal(ra.Layers, rb.Layers) {
		t.Errorf("pods use different layers: %v vs %v", ra.Layers, rb.Layers)
	}
	// Each layer once: the cache holds exactly the dataset's two layers,
	// whatever the number of volumes.
	if got := cachedLayers(t); !slices.Equal(got, sorted(datasetLayers)) {
		t.Errorf("node layer cache %v, want exactly the dataset's layers %v", got, sorted(datasetLayers))
	}
	t.Logf("strata du on the node:\n%s", strataCLI(t, "du"))
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

// 3. A static PV + PVC used by a 3-replica Deployment
// (deploy/examples/static-pv.yaml): three private uppers over one base.
func testStaticPVDeployment(t *testing.T) {
	t.Cleanup(func() {
		// After the namespace (cleanups run last-in first-out).
		if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "strata-sample", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete PV: %v", err)
		}
	})
	ns := namespace(t, "e2e-static")
	apply(t, ns, example(t, "static-pv.yaml", datasetRef))
	var dep *appsv1.Deployment
	eventually(t, 2*time.Minute, "deployment strata-sample 3/3 ready", func() (bool, error) {
		var err error
		dep, err = kube.AppsV1().Deployments(ns).Get(context.Background(), "strata-sample", metav1.GetOptions{})
		return err == nil && dep.Status.ReadyReplicas == 3, err
	})
	pods, err := kube.CoreV1().Pods(ns).List(ctx(t), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=static-pv"})
	if err != nil || len(pods.Items) != 3 {
		t.Fatalf("pods of the deployment: %d, %v", len(pods.Items), err)
	}
	dirs := map[string]bool{}
	for i := range pods.Items {
		p := &pods.Items[i]
		checkDatasetView(t, ns, p.Name, "/data")
		// All three write the same file name: each reads back its own.
		if out := mustExec(t, ns, p.Name, "cat /data/written-by-pod.txt"); out != "written by "+p.Name+"\n" {
			t.Errorf("%s reads %q from its written-by-pod.txt", p.Name, out)
		}
		// A PV's volume is named after the PV in kubelet's pod dir.
		r := recordFor(t, volumePath(p, "strata-sample"))
		if r.VolumeID != "strata-sample" {
			t.Errorf("%s: volume id %q, want the PV's handle strata-sample", p.Name, r.VolumeID)
		}
		dirs[r.dir] = true
	}
	if len(dirs) != 3 {
		t.Errorf("3 replicas have %d volume dirs (private uppers), want 3: %v", len(dirs), dirs)
	}
}

// 4. A read-only volume (deploy/examples/readonly.yaml) refuses writes with
// EROFS and has no upper dir on the node.
func testReadOnlyVolume(t *testing.T) {
	ns := namespace(t, "e2e-readonly")
	apply(t, ns, example(t, "readonly.yaml", datasetRef))
	pod := waitRunning(t, ns, "strata-readonly")
	checkDatasetView(t, ns, pod.Name, "/data")
	out, err := podExec(ns, pod.Name, "touch /data/new-file")
	if err == nil || !strings.Contains(out, "Read-only file system") {
		t.Errorf("touch on the read-only volume: err %v, output %q, want EROFS (Read-only file system)", err, out)
	}
	target := volumePath(pod, "dataset")
	ms := overlaysUnder(t, target)
	if len(ms) != 1 || !ms[0].HasOption("ro") {
		t.Errorf("read-only volume's mounts %+v, want one read-only overlay", ms)
	}
	r := recordFor(t, target)
	if !r.ReadOnly {
		t.Errorf("volume record is not read-only: %+v", r)
	}
	for _, p := range []string{"upper", "fs"} {
		if _, err := os.Stat(filepath.Join(r.dir, p)); !os.IsNotExist(err) {
			t.Errorf("a read-only volume has an upper dir %s: %v", p, err)
		}
	}
}

// A subPath volume (deploy/examples/subpath.yaml) shows only that directory
// of the image.
func testSubPathVolume(t *testing.T) {
	ns := namespace(t, "e2e-subpath")
	apply(t, ns, example(t, "subpath.yaml", datasetRef))
	pod := waitRunning(t, ns, "strata-subpath")
	if out := mustExec(t, ns, pod.Name, "ls /raw; cat /raw/a.txt"); out != "a.txt\nalpha\n" {
		t.Errorf("subPath data/raw shows %q, want only a.txt (b.txt is whited out)", out)
	}
}

// 5. Deleting the pod unpublishes: the mount and the upper go, the layers
// stay cached for the next pod.
func testPodDeletionUnpublishes(t *testing.T) {
	ns := namespace(t, "e2e-delete")
	createPod(t, ns, inlinePod("doomed", datasetRef, false))
	pod := waitRunning(t, ns, "doomed")
	mustExec(t, ns, pod.Name, "echo gone-soon > /data/scratch")
	target := volumePath(pod, "dataset")
	r := recordFor(t, target)
	layersBefore := cachedLayers(t)

	deletePod(t, ns, pod.Name)
	// kubelet removes the pod from the API only once its volumes are
	// unpublished: nothing may be left by now.
	if ms := overlaysUnder(t, filepath.Join(c.kubeletDir, "pods", string(pod.UID))); len(ms) != 0 {
		t.Errorf("mounts left under the deleted pod's dir: %+v", ms)
	}
	if _, err := os.Stat(r.dir); !os.IsNotExist(err) {
		t.Errorf("volume dir %s (upper) left after the pod was deleted: %v", r.dir, err)
	}
	if got := cachedLayers(t); !slices.Equal(got, layersBefore) {
		t.Errorf("layer cache changed by the unpublish: %v -> %v", layersBefore, got)
	}
}

// 6. The plugin pod is deleted and recreated while workload pods run: their
// volumes keep working, and later deletions still clean up.
func testPluginRestart(t *testing.T) {
	ns := namespace(t, "e2e-restart")
	createPod(t, ns, inlinePod("worker-a", datasetRef, false))
	createPod(t, ns, inlinePod("worker-b", datasetRef, false))
	a, b := waitRunning(t, ns, "worker-a"), waitRunning(t, ns, "worker-b")
	mustExec(t, ns, a.Name, "echo before > /data/before")
	ra := recordFor(t, volumePath(a, "dataset"))

	old := pluginPod(t)
	zero := int64(0)
	start := time.Now()
	if err := kube.CoreV1().Pods(releaseNS).Delete(ctx(t), old.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "a new plugin pod", func() (bool, error) {
		pods, err := kube.CoreV1().Pods(releaseNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
		if err != nil {
			return false, err
		}
		for _, p := range pods.Items {
			if p.UID != old.UID && podReady(&p) {
				return true, nil
			}
		}
		return false, fmt.Errorf("old plugin pod %s still the only one", old.Name)
	})
	waitPluginReady(t)
	t.Logf("plugin pod replaced and registered again in %.1f s", time.Since(start).Seconds())

	for _, p := range []*corev1.Pod{a, b} {
		checkDatasetView(t, ns, p.Name, "/data")
		if out := mustExec(t, ns, p.Name, "echo after > /data/after; cat /data/after"); out != "after\n" {
			t.Errorf("%s cannot write after the plugin restart: %q", p.Name, out)
		}
	}
	if out := mustExec(t, ns, a.Name, "cat /data/before"); out != "before\n" {
		t.Errorf("worker-a lost its write across the plugin restart: %q", out)
	}

	deletePod(t, ns, a.Name)
	if ms := overlaysUnder(t, filepath.Join(c.kubeletDir, "pods", string(a.UID))); len(ms) != 0 {
		t.Errorf("the restarted plugin left mounts of the deleted pod: %+v", ms)
	}
	if _, err := os.Stat(ra.dir); !os.IsNotExist(err) {
		t.Errorf("the restarted plugin left the deleted pod's volume dir %s: %v", ra.dir, err)
	}
	checkDatasetView(t, ns, b.Name, "/data")
}

// 7. A missing image: the pod stays Pending, with an event that names the
// image and what the registry answered.
func testMissingImage(t *testing.T) {
	ns := namespace(t, "e2e-missing")
	createPod(t, ns, inlinePod("lost", missingRef, false))
	var msg string
	eventually(t, 2*time.Minute, "a FailedMount event naming the missing image", func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=lost"})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.Reason == "FailedMount" && strings.Contains(e.Message, missingRef) {
				msg = e.Message
				return true, nil
			}
		}
		return false, fmt.Errorf("%d events, none FailedMount naming %s", len(evs.Items), missingRef)
	})
	t.Logf("event: %s", msg)
	for _, want := range []string{"NotFound", "MANIFEST_UNKNOWN"} {
		if !strings.Contains(msg, want) {
			t.Errorf("event message lacks %q (the registry's answer): %s", want, msg)
		}
	}
	// The plugin's own event says which step failed.
	ev := podEvent(t, ns, "lost", "PullFailed", missingRef, "MANIFEST_UNKNOWN")
	t.Logf("plugin event: %s", ev.Message)
	p, err := kube.CoreV1().Pods(ns).Get(ctx(t), "lost", metav1.GetOptions{})
	if err != nil || p.Status.Phase != corev1.PodPending {
		t.Errorf("pod with the missing image: phase %v, %v; want Pending", p.Status.Phase, err)
	}

	// A registry whose name does not resolve: every retry fails the same
	// way, and its events say so in the same words, so that Kubernetes
	// counts them on one event each (the count grows) instead of adding an
	// event per retry that differs only in a port number.
	const unresolvable = "does-not-exist.invalid/data/set:v1"
	createPod(t, ns, inlinePod("unresolvable", unresolvable, false))
	eventually(t, 4*time.Minute, "the unresolvable image's FailedMount and PullFailed events repeated on one event each", func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=unresolvable"})
		if err != nil {
			return false, err
		}
		events, counts := map[string]int{}, map[string]int32{}
		var seen []string
		for _, e := range evs.Items {
			if e.Reason == "FailedMount" || e.Reason == "PullFailed" {
				events[e.Reason]++
				counts[e.Reason] += e.Count
				seen = append(seen, fmt.Sprintf("%s x%d: %s", e.Reason, e.Count, e.Message))
			}
		}
		if events["FailedMount"] == 1 && events["PullFailed"] == 1 && counts["FailedMount"] >= 2 && counts["PullFailed"] >= 2 {
			t.Logf("aggregated events: %q", seen)
			for _, s := range seen {
				if !strings.Contains(s, "DNS lookup of does-not-exist.invalid failed") {
					t.Errorf("event does not say which lookup failed: %s", s)
				}
			}
			return true, nil
		}
		if events["FailedMount"] > 1 || events["PullFailed"] > 1 {
			return false, fmt.Errorf("a retry made a new event instead of repeating one: %q", seen)
		}
		return false, fmt.Errorf("events so far: %q", seen)
	})
}

// 8. helm upgrade keeps running volumes working; helm uninstall, after the
// workloads are gone, leaves no mount, no volume state, no registration and
// no object of the release. The layer cache stays in the state dir (a
// reinstall starts warm; docs/volumes.md says how to remove it).
func testHelmUpgradeUninstall(t *testing.T) {
	ns := namespace(t, "e2e-upgrade")
	createPod(t, ns, inlinePod("survivor", datasetRef, false))
	p := waitRunning(t, ns, "survivor")
	mustExec(t, ns, p.Name, "echo before-upgrade > /data/mark")
	old := pluginPod(t)

	out, err := helm("upgrade", release, chartDir(), "--namespace", releaseNS,
		"--reuse-values", "--set", "logLevel=5", "--wait", "--timeout", "3m")
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	eventually(t, 2*time.Minute, "the upgraded plugin pod", func() (bool, error) {
		np := pluginPod(t)
		return np.UID != old.UID, fmt.Errorf("plugin pod %s not replaced", old.Name)
	})
	waitPluginReady(t)
	if out := mustExec(t, ns, p.Name, "cat /data/mark; echo after-upgrade > /data/mark2; cat /data/mark2"); out != "before-upgrade\nafter-upgrade\n" {
		t.Errorf("volume after helm upgrade reads %q", out)
	}
	deletePod(t, ns, p.Name)
	deleteNamespace(t, ns)

	out, err = helm("uninstall", release, "--namespace", releaseNS, "--wait", "--timeout", "2m")
	if err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	eventually(t, 2*time.Minute, "plugin pods gone", func() (bool, error) {
		pods, err := kube.CoreV1().Pods(releaseNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
		return err == nil && len(pods.Items) == 0, err
	})
	eventually(t, time.Minute, "kubelet deregistered the driver", func() (bool, error) {
		has, err := csiNodeHasDriver(c.nodeName)
		return !has, err
	})

	for _, dir := range []string{c.kubeletDir, c.stateDir} {
		if ms := overlaysUnder(t, dir); len(ms) != 0 {
			t.Errorf("overlay mounts left under %s: %+v", dir, ms)
		}
	}
	if rs := records(t); len(rs) != 0 {
		t.Errorf("volume records left in the state dir: %+v", rs)
	}
	for _, pat := range []string{
		filepath.Join(c.kubeletDir, "plugins_registry", driverName+"*"),
		filepath.Join(c.kubeletDir, "plugins", driverName, "*.sock"),
		filepath.Join(c.stateDir, "tmp", "*"),
		filepath.Join(c.stateDir, "refs", "*"),
		// The clone scenarios deleted their claims: no clone is left.
		filepath.Join(c.stateDir, "clones", "*"),
	} {
		if m, _ := filepath.Glob(pat); len(m) > 0 {
			t.Errorf("left after uninstall: %v", m)
		}
	}
	// Nor a loop device of a clone's or a capped upper's filesystem.
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), c.stateDir+"/") {
			t.Errorf("loop device left after uninstall: %s backs %s", f, strings.TrimSpace(string(b)))
		}
	}
	if _, err := kube.StorageV1().CSIDrivers().Get(ctx(t), driverName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("CSIDriver %s after uninstall: %v", driverName, err)
	}
	sel := metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + release}
	if l, err := kube.RbacV1().ClusterRoles().List(ctx(t), sel); err != nil || len(l.Items) != 0 {
		t.Errorf("cluster roles of the release left: %v %v", l, err)
	}
	if l, err := kube.CoreV1().ServiceAccounts(releaseNS).List(ctx(t), sel); err != nil || len(l.Items) != 0 {
		t.Errorf("service accounts of the release left: %v %v", l, err)
	}
	// The node's CSIStorageCapacity objects belong to its Node and stay;
	// the command docs/clones.md gives removes them.
	capSel := metav1.ListOptions{LabelSelector: "csi.storage.k8s.io/drivername=" + driverName}
	if out, err := kubectl("-n", releaseNS, "delete", "csistoragecapacities", "-l", capSel.LabelSelector); err != nil {
		t.Errorf("delete the CSIStorageCapacity objects left after uninstall: %v\n%s", err, out)
	}
	if l, err := kube.StorageV1().CSIStorageCapacities(releaseNS).List(ctx(t), capSel); err != nil || len(l.Items) != 0 {
		t.Errorf("CSIStorageCapacity objects left after their removal: %v %v", l, err)
	}
	got := cachedLayers(t)
	for _, l := range datasetLayers {
		if !slices.Contains(got, l) {
			t.Errorf("layer cache after uninstall %v lacks the dataset's layer %s: the cache is kept", got, l)
		}
	}
	t.Logf("state dir after uninstall (the layer cache, kept):\n%s", strataCLI(t, "du"))
}
