//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/strata-csi/strata/driver/clones"
	csitest "github.com/strata-csi/strata/test/csi"
)

// TestNodes proves Strata across the nodes of a many-node cluster
// (NODES=3 hack/e2e, make e2e-nodes): a plugin pod and a layer cache per
// node, clones placed on and pinned to their nodes, the controller's leader
// elsewhere and replaced, each node's sweep and commits touching only its
// own clones, a rolling upgrade one node at a time, and a node lost. The
// steps run in order on one installation and share the namespace
// e2e-nodes; the last one brings the lost node back.
func TestNodes(t *testing.T) {
	if len(c.nodes) < 3 {
		t.Fatalf("TestNodes needs a cluster of 3 nodes or more (NODES=3 hack/e2e, make e2e-nodes); this one has %d", len(c.nodes))
	}
	steps := []struct {
		name string
		fn   func(*testing.T)
	}{
		{"Install", testNodesInstall},
		{"Placement", testPlacement},
		{"ControllerFailover", testControllerFailover},
		{"CommitOnItsNode", testCommitOnItsNode},
		{"DeletionOnItsNode", testDeletionOnItsNode},
		{"RollingUpgrade", testRollingUpgrade},
		{"NodeLoss", testNodeLoss},
	}
	namespace(t, nodesNS) // deleted when every step is over
	createCloneClass(t)
	for i, s := range steps {
		if !t.Run(s.name, s.fn) && i <= 1 {
			t.Fatalf("%s failed: the other steps need it", s.name)
		}
	}
}

const (
	nodesNS = "e2e-nodes"
	// spreadSet is the StatefulSet of the placement step: 3 replicas, each
	// on its own node, each with a clone of the dataset.
	spreadSet = "spread"
)

var (
	// regLog counts what each node asks of the registry.
	regLog = &requestLog{blobGets: map[string]map[string]int{}, writes: map[string]int{}}
	// placed is where the placement step's pods and clones are, by pod.
	placed = map[string]placement{}
	// deletedClones are the clones whose claims the steps deleted: volume
	// handle -> its node, the only one whose sweep may remove it.
	deletedClones = map[string]string{}
)

type placement struct {
	node       node
	pv, handle string
}

// requestLog counts a registry's requests by client address: with many
// nodes, a node's requests come from its own address (the nodes reach the
// control plane's 127.0.0.1 through their eth0, hack/cluster/README.md).
type requestLog struct {
	mu       sync.Mutex
	blobGets map[string]map[string]int // client address -> blob digest -> GETs
	writes   map[string]int            // client address -> upload requests (POST, PATCH, PUT)
}

func (l *requestLog) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		l.mu.Lock()
		switch {
		case r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:"):
			if l.blobGets[host] == nil {
				l.blobGets[host] = map[string]int{}
			}
			l.blobGets[host][r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]++
		case r.Method == http.MethodPost || r.Method == http.MethodPatch || r.Method == http.MethodPut:
			l.writes[host]++
		}
		l.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

// gets is how many times the client at addr fetched blob digest.
func (l *requestLog) gets(addr, digest string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.blobGets[addr][digest]
}

// writers is the upload requests so far, by client address.
func (l *requestLog) writers() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.writes)
}

// nodeNamed is the cluster's node of that name.
func nodeNamed(t *testing.T, name string) node {
	t.Helper()
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	t.Fatalf("no node %q in the cluster (%d nodes)", name, len(c.nodes))
	return node{}
}

// mounts is the node's mount table, read inside its mount namespace.
func (n node) mounts(t *testing.T) []csitest.Mount {
	t.Helper()
	if n.mntns == "" {
		ms, err := csitest.Mounts()
		if err != nil {
			t.Fatal(err)
		}
		return ms
	}
	out, err := exec.Command("nsenter", "--mount="+n.mntns, "--", "cat", "/proc/self/mountinfo").Output()
	if err != nil {
		t.Fatalf("mount table of node %s: %v", n.name, err)
	}
	ms, err := csitest.ParseMountinfo(strings.NewReader(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// overlayAt reports whether the node has an overlay mounted at path.
func (n node) overlayAt(t *testing.T, path string) bool {
	t.Helper()
	for _, m := range n.mounts(t) {
		if m.MountPoint == path && m.FsType == "overlay" {
			return true
		}
	}
	return false
}

// cloneDisk is the host path of a clone's disk image on node n.
func (n node) cloneDisk(handle string) string {
	return filepath.Join(n.stateDir, "clones", handle, "disk.img")
}

// pluginLog is the log of the plugin container of a pod.
func pluginLog(t *testing.T, pod string) string {
	t.Helper()
	out, err := kubectl("-n", releaseNS, "logs", pod, "-c", "strata-csi")
	if err != nil {
		t.Fatalf("logs of %s: %v\n%s", pod, err, out)
	}
	return out
}

// testNodesInstall: the registry (which counts each node's requests), the
// dataset, and the chart with two controller replicas: a plugin pod on
// every node, each registered with its own kubelet.
func testNodesInstall(t *testing.T) {
	startRegistry(t, regLog.wrap(registry.New(registry.Logger(log.New(io.Discard, "", 0)))))
	pushImages(t)
	installChart(t, "--set", "controller.replicas=2")
	for _, n := range c.nodes {
		p := pluginPodOn(t, n.name)
		t.Logf("node %s (%s): plugin pod %s", n.name, n.ip, p.Name)
	}
	// Each node's state is its own: the host's state dir (where a
	// single-node cluster's plugin keeps it) is empty.
	if ents, err := os.ReadDir(c.stateDir); err != nil || len(ents) != 0 {
		t.Errorf("the host's %s holds %d entries (%v): with many nodes each node's state is under its own dir", c.stateDir, len(ents), err)
	}
}

// spreadManifest is the placement step's StatefulSet: replicas pods that
// may not share a node, each with a clone of the dataset.
func spreadManifest(replicas int) string {
	return cloneSet{name: spreadSet, replicas: replicas, class: cloneClass, size: cloneSize, parallel: true,
		podSpec: `      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels: {app: ` + spreadSet + `}
`}.manifest()
}

// pvNode is the node that a PV's node affinity names (the driver's
// topology key), or "".
func pvNode(pv *corev1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	terms := pv.Spec.NodeAffinity.Required.NodeSelectorTerms
	if len(terms) != 1 || len(terms[0].MatchExpressions) != 1 {
		return ""
	}
	e := terms[0].MatchExpressions[0]
	if e.Key != clones.TopologyKey || e.Operator != corev1.NodeSelectorOpIn || len(e.Values) != 1 {
		return ""
	}
	return e.Values[0]
}

// testPlacement: a StatefulSet of 3 replicas with anti-affinity gets one
// clone on each node, pinned there by its PV's node affinity; each node
// downloads each layer of the dataset once, into its own cache; each pod
// keeps its writes across its deletion and comes back on its clone's node.
func testPlacement(t *testing.T) {
	apply(t, nodesNS, spreadManifest(3))
	pods := map[string]*corev1.Pod{}
	for i := range 3 {
		name := fmt.Sprintf("%s-%d", spreadSet, i)
		p := waitRunning(t, nodesNS, name)
		checkDatasetView(t, nodesNS, name, "/data")
		pv := boundPV(t, nodesNS, "data-"+name)
		placed[name] = placement{node: nodeNamed(t, p.Spec.NodeName), pv: pv.Name, handle: pv.Spec.CSI.VolumeHandle}
		pods[name] = p
		if got := pvNode(pv); got != p.Spec.NodeName {
			t.Errorf("PV %s of %s: node affinity %+v names node %q, want the pod's node %s", pv.Name, name, pv.Spec.NodeAffinity, got, p.Spec.NodeName)
		}
		mustExec(t, nodesNS, name, "echo "+name+" on "+p.Spec.NodeName+" > /data/owner")
	}
	used := map[string]string{}
	for name, pl := range placed {
		if other, ok := used[pl.node.name]; ok {
			t.Fatalf("%s and %s are both on node %s: the anti-affinity spreads them", name, other, pl.node.name)
		}
		used[pl.node.name] = name
	}
	t.Logf("placement: %v", used)

	// Each clone's disk is on its node only, and its mount is in its
	// node's mount table only.
	hostMounts, err := csitest.MountsUnder(c.kubeletDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(hostMounts) != 0 {
		t.Errorf("mounts under the host's %s: %+v; the nodes' mounts stay in the nodes", c.kubeletDir, hostMounts)
	}
	for name, pl := range placed {
		target := filepath.Join(c.kubeletDir, "pods", string(pods[name].UID), "volumes", "kubernetes.io~csi", pl.pv, "mount")
		for _, n := range c.nodes {
			_, err := os.Stat(n.cloneDisk(pl.handle))
			mounted := n.overlayAt(t, target)
			switch {
			case n.name == pl.node.name && (err != nil || !mounted):
				t.Errorf("%s's clone on its node %s: disk %v, overlay at %s %t", name, n.name, err, target, mounted)
			case n.name != pl.node.name && (!os.IsNotExist(err) || mounted):
				t.Errorf("%s's clone is on node %s too: disk %v, overlay at %s %t", name, n.name, err, target, mounted)
			}
		}
	}

	// One download of each layer per node: each node caches its own.
	var counts []string
	for _, n := range c.nodes {
		for i, blob := range datasetBlobs {
			got := regLog.gets(n.ip, blob)
			counts = append(counts, fmt.Sprintf("%s layer %d: %d", n.name, i+1, got))
			if got != 1 {
				t.Errorf("node %s (%s) downloaded layer %s %d times, want once", n.name, n.ip, blob, got)
			}
		}
		for _, l := range datasetLayers {
			if _, err := os.Stat(filepath.Join(n.stateDir, "layers", "sha256", strings.TrimPrefix(l, "sha256:"))); err != nil {
				t.Errorf("layer %s is not in node %s's own cache: %v", l, n.name, err)
			}
		}
	}
	t.Logf("layer downloads: %s", strings.Join(counts, ", "))

	// Every pod deleted at once: each comes back on its clone's node, with
	// its writes.
	for name := range placed {
		one := int64(1)
		if err := kube.CoreV1().Pods(nodesNS).Delete(ctx(t), name, metav1.DeleteOptions{GracePeriodSeconds: &one}); err != nil {
			t.Fatalf("delete pod %s: %v", name, err)
		}
	}
	for name, pl := range placed {
		p := waitReplaced(t, nodesNS, name, pods[name].UID)
		if p.Spec.NodeName != pl.node.name {
			t.Errorf("%s came back on node %s, its clone is on %s", name, p.Spec.NodeName, pl.node.name)
		}
		if out := mustExec(t, nodesNS, name, "cat /data/owner"); out != name+" on "+pl.node.name+"\n" {
			t.Errorf("%s reads %q after its deletion, want its own write", name, out)
		}
	}
	for _, n := range c.nodes {
		for _, blob := range datasetBlobs {
			if got := regLog.gets(n.ip, blob); got != 1 {
				t.Errorf("node %s downloaded layer %s %d times after the pods came back, want once in all", n.name, blob, got)
			}
		}
	}
}

// waitReplaced waits until pod ns/name is a new pod (another UID), running
// and ready.
func waitReplaced(t *testing.T, ns, name string, old types.UID) *corev1.Pod {
	t.Helper()
	eventually(t, 2*time.Minute, "pod "+ns+"/"+name+" replaced", func() (bool, error) {
		p, err := kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return p.UID != old, fmt.Errorf("still pod %s", p.UID)
	})
	return waitRunning(t, ns, name)
}

// leaseHolder is the controller replica that holds the provisioning Lease:
// its identity and its pod.
func leaseHolder(t *testing.T) (string, *corev1.Pod, error) {
	t.Helper()
	l, err := kube.CoordinationV1().Leases(releaseNS).Get(context.Background(), "strata-csi-dev", metav1.GetOptions{})
	if err != nil {
		return "", nil, err
	}
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" {
		return "", nil, fmt.Errorf("lease %s/strata-csi-dev has no holder", releaseNS)
	}
	id := *l.Spec.HolderIdentity
	podName, _, _ := strings.Cut(id, "_") // the pod's host name, then a UUID
	p, err := kube.CoreV1().Pods(releaseNS).Get(context.Background(), podName, metav1.GetOptions{})
	if err != nil {
		return id, nil, fmt.Errorf("the lease's holder %s: %w", id, err)
	}
	return id, p, nil
}

// testControllerFailover: the controller's leader runs on a node other than
// those of some clones; its pod deleted, the standby replica takes the Lease
// and provisions a new claim's clone.
func testControllerFailover(t *testing.T) {
	var id string
	var leader *corev1.Pod
	eventually(t, time.Minute, "a controller replica holds the lease", func() (bool, error) {
		var err error
		id, leader, err = leaseHolder(t)
		return err == nil, err
	})
	ctrl, err := kube.CoreV1().Pods(releaseNS).List(ctx(t), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=controller"})
	if err != nil {
		t.Fatal(err)
	}
	nodesOf := map[string]string{}
	for _, p := range ctrl.Items {
		nodesOf[p.Name] = p.Spec.NodeName
	}
	t.Logf("controller replicas (pod: node): %v; leader %s", nodesOf, id)
	if len(nodesOf) != 2 || nodesOf[leader.Name] == "" {
		t.Fatalf("controller replicas %v, leader pod %s: want 2 replicas, the leader among them", nodesOf, leader.Name)
	}
	if vs := slices.Collect(maps.Values(nodesOf)); vs[0] == vs[1] {
		t.Errorf("both controller replicas on node %s: the chart's anti-affinity prefers different nodes", vs[0])
	}
	var elsewhere []string
	for name, pl := range placed {
		if pl.node.name != leader.Spec.NodeName {
			elsewhere = append(elsewhere, name+" on "+pl.node.name)
		}
	}
	sort.Strings(elsewhere)
	if len(elsewhere) == 0 {
		t.Fatalf("every clone is on the leader's node %s", leader.Spec.NodeName)
	}
	t.Logf("the leader runs on node %s; clones on other nodes: %v", leader.Spec.NodeName, elsewhere)

	var standby string
	for name := range nodesOf {
		if name != leader.Name {
			standby = name
		}
	}
	// The nodes cordoned while the leader goes, so that the Deployment's
	// new pod cannot start and race the standby for the Lease: the standby
	// must take it.
	for _, n := range c.nodes {
		if out, err := kubectl("cordon", n.name); err != nil {
			t.Fatalf("cordon %s: %v\n%s", n.name, err, out)
		}
	}
	uncordon := func() {
		for _, n := range c.nodes {
			if out, err := kubectl("uncordon", n.name); err != nil {
				t.Errorf("uncordon %s: %v\n%s", n.name, err, out)
			}
		}
	}
	t.Cleanup(uncordon) // again, in case of a failure: uncordoning is idempotent
	start := time.Now()
	if err := kube.CoreV1().Pods(releaseNS).Delete(ctx(t), leader.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete the leader's pod %s: %v", leader.Name, err)
	}
	var next *corev1.Pod
	eventually(t, 2*time.Minute, "the standby "+standby+" holds the lease", func() (bool, error) {
		nid, p, err := leaseHolder(t)
		if err != nil {
			return false, err
		}
		if p.Name != standby {
			return false, fmt.Errorf("held by %s", nid)
		}
		next = p
		return true, nil
	})
	t.Logf("lease moved from %s (node %s) to the standby %s (node %s) in %.1f s", leader.Name, leader.Spec.NodeName, next.Name, next.Spec.NodeName, time.Since(start).Seconds())
	uncordon()

	// Provisioning goes on: a new claim and its pod.
	apply(t, nodesNS, claim("after-failover", cloneSize)+"---\n"+claimPod("after-failover", "after-failover"))
	p := waitRunning(t, nodesNS, "after-failover")
	checkDatasetView(t, nodesNS, p.Name, "/data")
	pv := boundPV(t, nodesNS, "after-failover")
	n := nodeNamed(t, p.Spec.NodeName)
	if pvNode(pv) != n.name {
		t.Errorf("PV %s: node affinity names %q, want the pod's node %s", pv.Name, pvNode(pv), n.name)
	}
	if _, err := os.Stat(n.cloneDisk(pv.Spec.CSI.VolumeHandle)); err != nil {
		t.Errorf("the new claim's clone on node %s: %v", n.name, err)
	}
	deletePod(t, nodesNS, p.Name)
	if err := kube.CoreV1().PersistentVolumeClaims(nodesNS).Delete(ctx(t), "after-failover", metav1.DeleteOptions{}); err != nil {
		t.Errorf("delete claim after-failover: %v", err)
	}
	deletedClones[pv.Spec.CSI.VolumeHandle] = n.name
}

// testCommitOnItsNode: a VolumeCommit of the clone on the second node is
// claimed and pushed by that node's plugin alone.
func testCommitOnItsNode(t *testing.T) {
	second := c.nodes[1]
	var pod string
	for name, pl := range placed {
		if pl.node.name == second.name {
			pod = name
		}
	}
	if pod == "" {
		t.Fatalf("no clone of the placement step on node %s: %v", second.name, placed)
	}
	mustExec(t, nodesNS, pod, "echo committed on "+second.name+" > /data/data/commit.txt")
	before := regLog.writers()
	ref := registryAddr + "/e2e/nodes-committed:v1"
	apply(t, nodesNS, fmt.Sprintf(`apiVersion: strata.csi.dev/v1alpha1
kind: VolumeCommit
metadata:
  name: on-its-node
spec:
  source:
    persistentVolumeClaim: data-%s
  image: %s
`, pod, ref))
	st := commitSucceeded(t, nodesNS, "on-its-node").Status
	t.Logf("VolumeCommit of %s's clone: node %s, %s", pod, st.Node, st.ImageRef)
	if st.Node != second.name {
		t.Errorf("VolumeCommit claimed by node %q, want %s, where the clone is", st.Node, second.name)
	}
	after := regLog.writers()
	for _, n := range c.nodes {
		pushed := after[n.ip] - before[n.ip]
		switch {
		case n.name == second.name && pushed == 0:
			t.Errorf("node %s sent no upload to the registry", n.name)
		case n.name != second.name && pushed != 0:
			t.Errorf("node %s sent %d upload requests for a commit of node %s's clone", n.name, pushed, second.name)
		}
	}
	// The other nodes' plugins left it alone.
	for _, n := range c.nodes {
		if n.name == second.name {
			continue
		}
		for _, l := range strings.Split(grepLines(pluginLog(t, pluginPodOn(t, n.name).Name), nodesNS+"/on-its-node"), "\n") {
			if strings.Contains(l, `"Committing"`) || strings.Contains(l, "refused") {
				t.Errorf("node %s's plugin acted on a commit of node %s's clone: %s", n.name, second.name, l)
			}
		}
	}
	// The pushed image holds the write (a pod on any node mounts it).
	createPod(t, nodesNS, inlinePod("committed-reader", st.ImageRef, true))
	r := waitRunning(t, nodesNS, "committed-reader")
	if out := mustExec(t, nodesNS, r.Name, "cat /data/data/commit.txt"); out != "committed on "+second.name+"\n" {
		t.Errorf("the committed image reads %q", out)
	}
	deletePod(t, nodesNS, r.Name)
}

// grepLines is the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// testDeletionOnItsNode: the StatefulSet scaled down and the claim of the
// third replica deleted, the clone's node frees its disk; the other nodes'
// sweeps leave their clones alone.
func testDeletionOnItsNode(t *testing.T) {
	gone := spreadSet + "-2"
	pl := placed[gone]
	if out, err := kubectl("-n", nodesNS, "scale", "statefulset", spreadSet, "--replicas=2"); err != nil {
		t.Fatalf("scale %s: %v\n%s", spreadSet, err, out)
	}
	eventually(t, 2*time.Minute, "pod "+gone+" gone", func() (bool, error) {
		_, err := kube.CoreV1().Pods(nodesNS).Get(context.Background(), gone, metav1.GetOptions{})
		return apierrors.IsNotFound(err), err
	})
	inodes := map[string]uint64{} // pod -> its clone's disk image's inode
	for name, p := range placed {
		fi, err := os.Stat(p.node.cloneDisk(p.handle))
		if err != nil {
			t.Fatalf("%s's clone on node %s: %v", name, p.node.name, err)
		}
		inodes[name] = fi.Sys().(*syscall.Stat_t).Ino
	}
	freed := diskBytes(t, filepath.Dir(pl.node.cloneDisk(pl.handle)))
	start := time.Now()
	if err := kube.CoreV1().PersistentVolumeClaims(nodesNS).Delete(ctx(t), "data-"+gone, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete claim data-%s: %v", gone, err)
	}
	deletedClones[pl.handle] = pl.node.name
	// The sweep keeps a clone made less than two minutes ago and checks
	// every minute (docs/clones.md): within 3 minutes it is gone.
	eventually(t, 3*time.Minute+30*time.Second, "clone "+pl.handle+" removed from node "+pl.node.name, func() (bool, error) {
		_, err := os.Stat(filepath.Dir(pl.node.cloneDisk(pl.handle)))
		return os.IsNotExist(err), err
	})
	t.Logf("claim deleted -> node %s freed %d bytes in %.1f s", pl.node.name, freed, time.Since(start).Seconds())
	removed := "Removed a persistent clone"
	if l := pluginLog(t, pluginPodOn(t, pl.node.name).Name); !strings.Contains(grepLines(l, removed), pl.handle) {
		t.Errorf("node %s's plugin log has no %q line for %s", pl.node.name, removed, pl.handle)
	}
	for name, p := range placed {
		if name == gone {
			continue
		}
		if fi, err := os.Stat(p.node.cloneDisk(p.handle)); err != nil || fi.Sys().(*syscall.Stat_t).Ino != inodes[name] {
			t.Errorf("%s's clone on node %s is not the same file: %v", name, p.node.name, err)
		}
		if out := mustExec(t, nodesNS, name, "cat /data/owner"); out != name+" on "+p.node.name+"\n" {
			t.Errorf("%s reads %q after another node's claim was deleted", name, out)
		}
	}
	// Every node's sweep removed only clones of its own whose claims were
	// deleted.
	for _, n := range c.nodes {
		for _, l := range strings.Split(grepLines(pluginLog(t, pluginPodOn(t, n.name).Name), removed), "\n") {
			if l == "" {
				continue
			}
			mine := false
			for handle, owner := range deletedClones {
				mine = mine || (owner == n.name && strings.Contains(l, handle))
			}
			if !mine {
				t.Errorf("node %s removed a clone that is not one of its deleted ones: %s", n.name, l)
			}
		}
	}
	delete(placed, gone)
}

// testRollingUpgrade: helm upgrade to a new plugin image (the plugin built
// again as another version) replaces the plugin pods one node at a time;
// the volumes mounted before keep working, and a new volume on each node is
// published by the new version.
func testRollingUpgrade(t *testing.T) {
	createPod(t, nodesNS, inlinePod("before-upgrade", datasetRef, false))
	before := waitRunning(t, nodesNS, "before-upgrade")
	mustExec(t, nodesNS, before.Name, "echo before > /data/mark")

	repo, newTag := nextPluginImage(t)
	old := map[string]string{} // node -> plugin pod UID
	for _, n := range c.nodes {
		old[n.name] = string(pluginPodOn(t, n.name).UID)
	}

	// Watch the plugin pods while helm upgrades: no moment with two
	// nodes without a ready plugin.
	stop := make(chan struct{})
	worst := make(chan int, 1)
	go func() {
		most := 0
		for {
			select {
			case <-stop:
				worst <- most
				return
			case <-time.After(100 * time.Millisecond):
			}
			pods, err := kube.CoreV1().Pods(releaseNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
			if err != nil {
				continue
			}
			ready := map[string]bool{}
			for i := range pods.Items {
				if p := &pods.Items[i]; p.DeletionTimestamp == nil && podReady(p) {
					ready[p.Spec.NodeName] = true
				}
			}
			most = max(most, len(c.nodes)-len(ready))
		}
	}()
	start := time.Now()
	out, err := helm("upgrade", release, chartDir(), "--namespace", releaseNS,
		"--reuse-values", "--set-string", "image.tag="+newTag, "--wait", "--timeout", "5m")
	if err != nil {
		close(stop)
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	eventually(t, 3*time.Minute, "a new plugin pod of the new image on every node", func() (bool, error) {
		for _, n := range c.nodes {
			pods, err := kube.CoreV1().Pods(releaseNS).List(context.Background(), metav1.ListOptions{
				LabelSelector: "app.kubernetes.io/component=node", FieldSelector: "spec.nodeName=" + n.name})
			if err != nil {
				return false, err
			}
			if len(pods.Items) != 1 || string(pods.Items[0].UID) == old[n.name] || !podReady(&pods.Items[0]) ||
				pods.Items[0].Spec.Containers[0].Image != repo+":"+newTag {
				return false, fmt.Errorf("node %s: %d plugin pods, not yet one new ready pod of %s", n.name, len(pods.Items), newTag)
			}
		}
		return true, nil
	})
	close(stop)
	most := <-worst
	t.Logf("rolling upgrade to %s: %.1f s; at most %d node(s) at once without a ready plugin", newTag, time.Since(start).Seconds(), most)
	if most > 1 {
		t.Errorf("%d nodes were without a ready plugin at once: the rollout goes one node at a time", most)
	}
	waitPluginReady(t)

	// The volumes mounted before: the clones and the inline volume.
	if out := mustExec(t, nodesNS, before.Name, "cat /data/mark; echo after > /data/mark2; cat /data/mark2"); out != "before\nafter\n" {
		t.Errorf("the inline volume mounted before the upgrade reads %q", out)
	}
	for name, p := range placed {
		if out := mustExec(t, nodesNS, name, "cat /data/owner; echo upgraded > /data/upgraded; cat /data/upgraded"); out != name+" on "+p.node.name+"\nupgraded\n" {
			t.Errorf("%s's clone after the upgrade reads %q", name, out)
		}
	}
	// A new volume on every node, published by the new version.
	for _, n := range c.nodes {
		name := "after-upgrade-" + strings.TrimPrefix(n.name, "strata-")
		apply(t, nodesNS, pinnedInlinePod(name, n.name))
		p := waitRunning(t, nodesNS, name)
		checkDatasetView(t, nodesNS, name, "/data")
		if !n.overlayAt(t, volumePath(p, "dataset")) {
			t.Errorf("no overlay for %s in node %s's mount table", name, n.name)
		}
		plugin := pluginPodOn(t, n.name).Name
		l := pluginLog(t, plugin)
		serving, published := grepLines(l, `"Serving CSI"`), grepLines(grepLines(l, `"Volume published"`), string(p.UID))
		if !strings.Contains(serving, `version="`+newTag) || published == "" {
			t.Errorf("node %s's plugin %s: %q, and published %q; want the version of %s and a publish of %s", n.name, plugin, serving, published, newTag, name)
		}
		deletePod(t, nodesNS, name)
	}
	deletePod(t, nodesNS, before.Name)
}

// nextPluginImage builds the plugin again as version <tag>-next (the
// plugin image's tag), a link of the cached build, into the image
// <repo>:<tag>-next, and imports it on every node: the new version of the
// rolling upgrade.
func nextPluginImage(t *testing.T) (repo, tag string) {
	t.Helper()
	repo, tag = splitImage(c.pluginImage)
	tag += "-next"
	dir := t.TempDir()
	start := time.Now()
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+tag, "-o", filepath.Join(dir, "strata-csi"), "./cmd/strata-csi")
	build.Dir, build.Env = c.repo, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build strata-csi %s: %v\n%s", tag, err, out)
	}
	if out, err := run("cp", filepath.Join(c.repo, "bin", "strata"), filepath.Join(dir, "strata")); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	image := exec.Command("go", "run", "./hack/buildimage", "--bin", dir, "--version", tag, "--tag", repo+":"+tag, "--out", filepath.Join(dir, "image.tar"))
	image.Dir = c.repo
	if out, err := image.CombinedOutput(); err != nil {
		t.Fatalf("buildimage %s: %v\n%s", tag, err, out)
	}
	for _, n := range c.nodes {
		if out, err := run(filepath.Join(c.dir, "bin", "in-node"), n.name, "ctr", "images", "import", filepath.Join(dir, "image.tar")); err != nil {
			t.Fatalf("import %s:%s on node %s: %v\n%s", repo, tag, n.name, err, out)
		}
	}
	t.Logf("built %s:%s and imported it on %d nodes in %.1f s", repo, tag, len(c.nodes), time.Since(start).Seconds())
	return repo, tag
}

// pinnedInlinePod is an inline volume pod on the named node.
func pinnedInlinePod(name, nodeName string) string {
	return strings.Replace(inlinePod(name, datasetRef, false), "spec:\n",
		"spec:\n  nodeSelector:\n    kubernetes.io/hostname: "+nodeName+"\n", 1)
}

// testNodeLoss: the third node goes away (hack/cluster/node stop). A pod of
// the clone there stays Pending with a reason that says why; a new pod's
// inline volume lands on another node; docs/clones.md's recovery (delete
// the claim and create it again) gives a new clone on a node that is up.
// The node then comes back, and its sweep frees the old clone.
func testNodeLoss(t *testing.T) {
	lost := c.nodes[2]
	// A clone on the node to lose, with a write.
	apply(t, nodesNS, claim("precious", cloneSize)+"---\n"+pinnedClaimPod("precious-writer", "precious", lost.name))
	w := waitRunning(t, nodesNS, "precious-writer")
	mustExec(t, nodesNS, w.Name, "echo precious > /data/precious")
	pv := boundPV(t, nodesNS, "precious")
	if pvNode(pv) != lost.name {
		t.Fatalf("claim precious's PV names node %q, want %s", pvNode(pv), lost.name)
	}
	oldHandle := pv.Spec.CSI.VolumeHandle

	start := time.Now()
	if out, err := run(filepath.Join(c.repo, "hack", "cluster", "node"), "stop", lost.name); err != nil {
		t.Fatalf("hack/cluster/node stop %s: %v\n%s", lost.name, err, out)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			if out, err := run(filepath.Join(c.repo, "hack", "cluster", "node"), "start", lost.name); err != nil {
				t.Errorf("hack/cluster/node start %s: %v\n%s", lost.name, err, out)
			}
		}
	})
	eventually(t, 3*time.Minute, "node "+lost.name+" NotReady and tainted unreachable", func() (bool, error) {
		n, err := kube.CoreV1().Nodes().Get(context.Background(), lost.name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, taint := range n.Spec.Taints {
			if taint.Key == corev1.TaintNodeUnreachable && taint.Effect == corev1.TaintEffectNoSchedule {
				return true, nil
			}
		}
		return false, fmt.Errorf("taints %v", n.Spec.Taints)
	})
	t.Logf("node %s stopped -> NotReady and tainted unreachable in %.1f s", lost.name, time.Since(start).Seconds())

	// What a user sees: the writer's pod cannot be confirmed gone by a
	// kubelet that is down; an operator deletes it for good. Its claim's
	// next pod stays Pending and says why.
	zero := int64(0)
	if err := kube.CoreV1().Pods(nodesNS).Delete(ctx(t), w.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatalf("force-delete %s: %v", w.Name, err)
	}
	apply(t, nodesNS, claimPod("precious-again", "precious"))
	reason := pendingReason(t, nodesNS, "precious-again")
	t.Logf("precious-again: %s", reason)
	// v1.37's words: "0/3 nodes are available: 1 node(s) had untolerated
	// taint(s), 2 node(s) didn't match PersistentVolume's node affinity."
	if !strings.Contains(reason, "node(s) didn't match PersistentVolume's node affinity") && !strings.Contains(reason, "volume node affinity conflict") ||
		!strings.Contains(reason, "1 node(s) had untolerated taint") {
		t.Errorf("the pod of the lost node's clone: %q; want it to say that the other nodes do not match its PV's node affinity and that the one that does is tainted", reason)
	}

	// Inline volumes need no particular node: a new pod lands elsewhere.
	createPod(t, nodesNS, inlinePod("inline-elsewhere", datasetRef, false))
	p := waitRunning(t, nodesNS, "inline-elsewhere")
	if p.Spec.NodeName == lost.name {
		t.Errorf("inline-elsewhere scheduled on the lost node %s", lost.name)
	}
	checkDatasetView(t, nodesNS, p.Name, "/data")

	// docs/clones.md, "When the node is lost": delete the claim and create
	// it again; the next pod gets a new clone of the image on its new node.
	deletePod(t, nodesNS, "precious-again")
	if err := kube.CoreV1().PersistentVolumeClaims(nodesNS).Delete(ctx(t), "precious", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete claim precious: %v", err)
	}
	eventually(t, 2*time.Minute, "claim precious and its PV gone", func() (bool, error) {
		_, err := kube.CoreV1().PersistentVolumeClaims(nodesNS).Get(context.Background(), "precious", metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			return false, fmt.Errorf("claim: %v", err)
		}
		_, err = kube.CoreV1().PersistentVolumes().Get(context.Background(), pv.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Errorf("PV %s: %v", pv.Name, err)
	})
	apply(t, nodesNS, claim("precious", cloneSize)+"---\n"+claimPod("precious-recreated", "precious"))
	r := waitRunning(t, nodesNS, "precious-recreated")
	if r.Spec.NodeName == lost.name {
		t.Errorf("the re-created claim's pod is on the lost node")
	}
	checkDatasetView(t, nodesNS, r.Name, "/data")
	if out := mustExec(t, nodesNS, r.Name, "test -e /data/precious && echo kept || echo new"); out != "new\n" {
		t.Errorf("the re-created claim's clone: %q, want a new clone of the image (the old one's data is on the lost node)", out)
	}
	newPV := boundPV(t, nodesNS, "precious")
	if pvNode(newPV) != r.Spec.NodeName {
		t.Errorf("the new PV names node %q, its pod is on %s", pvNode(newPV), r.Spec.NodeName)
	}
	// The old clone is still on the lost node's disk, which nobody swept.
	if _, err := os.Stat(lost.cloneDisk(oldHandle)); err != nil {
		t.Errorf("the old clone on the lost node's disk: %v", err)
	}

	// The node comes back: its plugin starts, and its sweep frees the old
	// clone, whose PV is gone.
	start = time.Now()
	if out, err := run(filepath.Join(c.repo, "hack", "cluster", "node"), "start", lost.name); err != nil {
		t.Fatalf("hack/cluster/node start %s: %v\n%s", lost.name, err, out)
	}
	eventually(t, 3*time.Minute, "node "+lost.name+" Ready", func() (bool, error) {
		n, err := kube.CoreV1().Nodes().Get(context.Background(), lost.name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return cond.Status == corev1.ConditionTrue, fmt.Errorf("Ready %s: %s", cond.Status, cond.Message)
			}
		}
		return false, nil
	})
	restarted = true
	waitPluginReady(t)
	t.Logf("node %s back: Ready and its plugin registered in %.1f s", lost.name, time.Since(start).Seconds())
	eventually(t, 3*time.Minute, "the old clone "+oldHandle+" removed from node "+lost.name, func() (bool, error) {
		_, err := os.Stat(filepath.Dir(lost.cloneDisk(oldHandle)))
		return os.IsNotExist(err), err
	})
	t.Logf("node %s freed the old clone %.1f s after it came back", lost.name, time.Since(start).Seconds())

	// A StatefulSet pod whose clone is on the node came back with it, its
	// clone mounted again (the node's mounts were gone, as after a reboot),
	// with its writes.
	for name, pl := range placed {
		if pl.node.name != lost.name {
			continue
		}
		eventually(t, 3*time.Minute, name+" running again on "+lost.name+" with its writes", func() (bool, error) {
			out, err := podExec(nodesNS, name, "cat /data/owner")
			if err != nil {
				return false, fmt.Errorf("%v: %s", err, out)
			}
			return out == name+" on "+lost.name+"\n", fmt.Errorf("reads %q", out)
		})
		t.Logf("%s is back on %s with its writes", name, lost.name)
	}
}

// pinnedClaimPod is claimPod on the named node.
func pinnedClaimPod(name, claimName, nodeName string) string {
	return strings.Replace(claimPod(name, claimName), "spec:\n",
		"spec:\n  nodeSelector:\n    kubernetes.io/hostname: "+nodeName+"\n", 1)
}

// pendingReason waits until the scheduler has said why pod ns/name is
// Pending (its PodScheduled condition), and returns that.
func pendingReason(t *testing.T, ns, name string) string {
	t.Helper()
	var msg string
	eventually(t, time.Minute, "pod "+ns+"/"+name+" unschedulable, with a reason", func() (bool, error) {
		p, err := kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if p.Status.Phase != corev1.PodPending {
			return false, fmt.Errorf("phase %s", p.Status.Phase)
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && cond.Reason == corev1.PodReasonUnschedulable {
				msg = cond.Message
				return true, nil
			}
		}
		return false, fmt.Errorf("conditions %+v", p.Status.Conditions)
	})
	// Still Pending a little later: the reason holds.
	time.Sleep(5 * time.Second)
	if p, err := kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{}); err != nil || p.Status.Phase != corev1.PodPending {
		t.Errorf("pod %s/%s: %v, %v; want still Pending", ns, name, p.Status.Phase, err)
	}
	return msg
}
