package commits

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/state"
)

const (
	testDriver = "strata.csi.dev"
	thisNode   = "node-1"
)

var (
	digestA = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}
	digestB = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("b", 64)}
)

// kubeletTarget is kubelet's target path of a CSI volume of pod uid: dir is
// the pod's volume name (inline) or the PV's name.
func kubeletTarget(uid, dir string) string {
	return filepath.Join("/var/lib/kubelet/pods", uid, "volumes", "kubernetes.io~csi", dir, "mount")
}

// writeRecord writes a publish record (and its upper dir) under root.
func writeRecord(t *testing.T, root, key string, rec state.Record) {
	t.Helper()
	dir := filepath.Join(root, state.Dir, key)
	if err := os.MkdirAll(filepath.Join(dir, state.UpperDir), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := state.Write(filepath.Join(dir, state.RecordFile), &rec); err != nil {
		t.Fatal(err)
	}
}

func testPod(name, uid, node string, phase corev1.PodPhase, vols ...corev1.Volume) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: name, UID: types.UID(uid)},
		Spec:       corev1.PodSpec{NodeName: node, Volumes: vols},
		Status:     corev1.PodStatus{Phase: phase},
	}
}

func inlineVol(name, driver string) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: driver}}}
}

func claimVol(name, claim string) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}
}

// claimUID is the UID of the test claim team-a/name.
func claimUID(name string) types.UID { return types.UID("uid-claim-" + name) }

// boundClaim is claim team-a/name bound to PersistentVolume pv, as the
// PersistentVolume controller leaves it (phase Bound); unbound if pv is
// empty.
func boundClaim(name, pv string) *corev1.PersistentVolumeClaim {
	c := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: name, UID: claimUID(name)},
		Spec: corev1.PersistentVolumeClaimSpec{VolumeName: pv}, Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimPending}}
	if pv != "" {
		c.Status.Phase = corev1.ClaimBound
	}
	return c
}

// csiPV is a PersistentVolume of driver bound to claim team-a/claim (its
// claimRef names the claim's namespace, name and UID).
// pendingClaim is claim team-a/name that names PersistentVolume pv in its
// spec, as a user may write it, and that the controller has not bound.
func pendingClaim(name, pv string) *corev1.PersistentVolumeClaim {
	c := boundClaim(name, pv)
	c.Status.Phase = corev1.ClaimPending
	return c
}

func csiPV(name, driver, handle, claim string) *corev1.PersistentVolume {
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
			CSI: &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: handle}}}}
	if claim != "" {
		pv.Spec.ClaimRef = &corev1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: "team-a", Name: claim, UID: claimUID(claim)}
	}
	return pv
}

func podSource(pod, volume string) *VolumeCommit {
	return &VolumeCommit{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "vc"},
		Spec: Spec{Source: Source{Pod: &PodVolume{Name: pod, Volume: volume}}, Image: "127.0.0.1:1/x:v2"}}
}

func claimSource(claim string) *VolumeCommit {
	return &VolumeCommit{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "vc"},
		Spec: Spec{Source: Source{PersistentVolumeClaim: claim}, Image: "127.0.0.1:1/x:v2"}}
}

// TestLocate: which volume of this node a VolumeCommit names, decided
// against real publish records and persistent clones in a state root: the
// node that holds the volume takes it, a node that does not leaves it, and
// the node that can tell it cannot be done refuses it with a reason.
func TestLocate(t *testing.T) {
	root := t.TempDir()
	img := "127.0.0.1:1/datasets/base:v1"
	writeRecord(t, root, "k-inline", state.Record{VolumeID: "csi-inline", TargetPath: kubeletTarget("uid-trainer", "data"),
		Image: img, Digest: digestA, PodNamespace: "team-a", PodName: "trainer", PodUID: "uid-trainer"})
	// Another pod's volume of the same name: never taken for trainer's.
	writeRecord(t, root, "k-other", state.Record{VolumeID: "csi-other", TargetPath: kubeletTarget("uid-other", "data"),
		Image: img, Digest: digestB, PodUID: "uid-other"})
	writeRecord(t, root, "k-ro", state.Record{VolumeID: "csi-ro", TargetPath: kubeletTarget("uid-reader", "data"),
		Image: img, Digest: digestA, ReadOnly: true, PodUID: "uid-reader"})
	// A static PV published for one pod through a claim: kubelet names the
	// directory after the PV.
	writeRecord(t, root, "k-static", state.Record{VolumeID: "static-1", TargetPath: kubeletTarget("uid-static", "pv-static"),
		Image: img, Digest: digestB, PodNamespace: "team-a", PodName: "static-user", PodUID: "uid-static"})
	// A static PV published twice on this node.
	for _, p := range []string{"p1", "p2"} {
		writeRecord(t, root, "k-shared-"+p, state.Record{VolumeID: "shared-1", TargetPath: kubeletTarget("uid-"+p, "pv-shared"),
			Image: img, Digest: digestA, PodNamespace: "team-a", PodName: p, PodUID: "uid-" + p})
	}
	// A persistent clone of this node, and its publish for a pod.
	if err := state.WriteClone(root, &state.Clone{VolumeID: "strata-clone1", CapacityBytes: 1 << 30,
		Stack: []state.StackImage{{Image: img, Digest: digestB}}}); err != nil {
		t.Fatal(err)
	}
	writeRecord(t, root, "k-clone", state.Record{VolumeID: "strata-clone1", TargetPath: kubeletTarget("uid-cloneuser", "pv-clone"),
		Image: img, Digest: digestB, PodUID: "uid-cloneuser", Clone: true, StagingPath: "/staging/x"})

	objs := []runtime.Object{
		testPod("trainer", "uid-trainer", thisNode, corev1.PodRunning, inlineVol("data", testDriver), inlineVol("scratch", "other.csi.io"),
			corev1.Volume{Name: "cfg", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}),
		testPod("elsewhere", "uid-elsewhere", "node-2", corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("unscheduled", "uid-unscheduled", "", corev1.PodPending, inlineVol("data", testDriver)),
		testPod("starting", "uid-starting", thisNode, corev1.PodPending, inlineVol("data", testDriver)),
		testPod("gone", "uid-gone", thisNode, corev1.PodSucceeded, inlineVol("data", testDriver)),
		testPod("reader", "uid-reader", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("static-user", "uid-static", thisNode, corev1.PodRunning, claimVol("data", "static-claim")),
		testPod("cloneuser", "uid-cloneuser", thisNode, corev1.PodRunning, claimVol("data", "clone-claim")),
		testPod("nfs-user", "uid-nfs", thisNode, corev1.PodRunning, claimVol("data", "nfs-claim")),
		boundClaim("static-claim", "pv-static"), csiPV("pv-static", testDriver, "static-1", "static-claim"),
		boundClaim("clone-claim", "pv-clone"), csiPV("pv-clone", testDriver, "strata-clone1", "clone-claim"),
		boundClaim("shared-claim", "pv-shared"), csiPV("pv-shared", testDriver, "shared-1", "shared-claim"),
		boundClaim("nfs-claim", "pv-nfs"), csiPV("pv-nfs", "nfs.csi.k8s.io", "nfs-1", "nfs-claim"),
		boundClaim("remote-claim", "pv-remote"), csiPV("pv-remote", testDriver, "remote-1", "remote-claim"),
		boundClaim("unbound", ""),
	}
	// Team B's static PV, published read-write on this node for team B's
	// pod. Team A names it in claims of its own, which the API server
	// accepts (spec.volumeName is the user's to set) but never binds.
	writeRecord(t, root, "k-team-b", state.Record{VolumeID: "static-b", TargetPath: kubeletTarget("uid-bpod", "pv-b"),
		Image: img, Digest: digestA, PodNamespace: "team-b", PodName: "b-user", PodUID: "uid-bpod"})
	pvB := csiPV("pv-b", testDriver, "static-b", "")
	pvB.Spec.ClaimRef = &corev1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: "team-b", Name: "data", UID: "uid-b-data"}
	// A claim deleted and made again under the same name: the PV still
	// names the old one's UID.
	recreated := csiPV("pv-recreated", testDriver, "static-1", "recreated")
	recreated.Spec.ClaimRef.UID = "uid-claim-recreated-before"
	// Binding in progress: the claim names the PV, which names the claim,
	// and the claim's phase is not Bound yet; or the PV names no claim yet.
	binding := boundClaim("binding", "pv-binding")
	binding.Status.Phase = corev1.ClaimPending
	objs = append(objs,
		pvB, pendingClaim("steal", "pv-b"), pendingClaim("steal-bound", "pv-b"),
		recreated, boundClaim("recreated", "pv-recreated"),
		binding, csiPV("pv-binding", testDriver, "static-1", "binding"),
		pendingClaim("prebound", "pv-free"), csiPV("pv-free", testDriver, "static-1", ""),
		testPod("thief", "uid-thief", thisNode, corev1.PodPending, claimVol("data", "steal")),
		testPod("ephemeral-thief", "uid-ethief", thisNode, corev1.PodRunning,
			corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{Ephemeral: &corev1.EphemeralVolumeSource{}}}),
		pendingClaim("ephemeral-thief-data", "pv-b"),
	)
	// A claim that even says Bound is no claim on a PV that names another.
	for _, o := range objs {
		if c, ok := o.(*corev1.PersistentVolumeClaim); ok && c.Name == "steal-bound" {
			c.Status.Phase = corev1.ClaimBound
		}
	}
	l := &locator{kube: fake.NewClientset(objs...), root: root, node: thisNode, driver: testDriver}

	for _, tc := range []struct {
		name    string
		vc      *VolumeCommit
		verdict verdict
		upper   string  // when here
		digest  v1.Hash // when here
		words   []string
	}{
		{"inline volume of a pod of this node", podSource("trainer", "data"), here, state.Upper(root, "k-inline"), digestA, nil},
		{"pod on another node", podSource("elsewhere", "data"), notHere, "", v1.Hash{}, []string{"node-2"}},
		{"pod not scheduled", podSource("unscheduled", "data"), notHere, "", v1.Hash{}, nil},
		{"pod not created yet", podSource("later", "data"), notHere, "", v1.Hash{}, []string{"does not exist"}},
		{"pod starting, volume not mounted yet", podSource("starting", "data"), notHere, "", v1.Hash{}, []string{"Pending"}},
		{"pod over, volume unpublished", podSource("gone", "data"), refused, "", v1.Hash{}, []string{"not published on node node-1", "Succeeded"}},
		{"no such volume in the pod", podSource("trainer", "nope"), refused, "", v1.Hash{}, []string{`no volume "nope"`, "data, scratch, cfg"}},
		{"volume of another CSI driver", podSource("trainer", "scratch"), refused, "", v1.Hash{}, []string{"other.csi.io"}},
		{"volume not CSI", podSource("trainer", "cfg"), refused, "", v1.Hash{}, []string{"not a strata.csi.dev volume"}},
		{"read-only volume", podSource("reader", "data"), refused, "", v1.Hash{}, []string{"read-only"}},
		{"pod's claim of a static PV", podSource("static-user", "data"), here, state.Upper(root, "k-static"), digestB, nil},
		{"pod's claim of a persistent clone", podSource("cloneuser", "data"), here, state.CloneUpper(root, "strata-clone1"), digestB, nil},
		{"pod's claim of another driver's PV", podSource("nfs-user", "data"), refused, "", v1.Hash{}, []string{"pv-nfs", "not a strata.csi.dev volume"}},
		{"claim of a persistent clone", claimSource("clone-claim"), here, state.CloneUpper(root, "strata-clone1"), digestB, nil},
		{"claim of a static PV published once", claimSource("static-claim"), here, state.Upper(root, "k-static"), digestB, nil},
		{"claim published twice here", claimSource("shared-claim"), refused, "", v1.Hash{}, []string{"2 times", "team-a/p1, team-a/p2", "spec.source.pod"}},
		{"claim of another driver", claimSource("nfs-claim"), refused, "", v1.Hash{}, []string{"pv-nfs"}},
		{"claim whose volume is on another node", claimSource("remote-claim"), notHere, "", v1.Hash{}, []string{"not published on this node"}},
		{"claim not bound", claimSource("unbound"), notHere, "", v1.Hash{}, []string{"not bound"}},
		{"claim not created yet", claimSource("later"), notHere, "", v1.Hash{}, []string{"does not exist"}},
		{"no source", &VolumeCommit{}, refused, "", v1.Hash{}, []string{"exactly one"}},
		{"claim naming another namespace's PV", claimSource("steal"), refused, "", v1.Hash{}, []string{"team-a/steal", "pv-b", "bound to another claim"}},
		{"claim naming another namespace's PV, phase Bound", claimSource("steal-bound"), refused, "", v1.Hash{}, []string{"bound to another claim"}},
		{"claim made again under an old claim's name", claimSource("recreated"), refused, "", v1.Hash{}, []string{"pv-recreated", "bound to another claim"}},
		{"claim and PV binding, claim not Bound yet", claimSource("binding"), notHere, "", v1.Hash{}, []string{"not bound"}},
		{"claim naming a PV that names no claim yet", claimSource("prebound"), notHere, "", v1.Hash{}, []string{"not bound"}},
		{"pod's claim naming another namespace's PV", podSource("thief", "data"), refused, "", v1.Hash{}, []string{"team-a/steal", "bound to another claim"}},
		{"pod's ephemeral claim naming another namespace's PV", podSource("ephemeral-thief", "data"), refused, "", v1.Hash{},
			[]string{"team-a/ephemeral-thief-data", "bound to another claim"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := l.locate(context.Background(), tc.vc)
			if err != nil {
				t.Fatalf("locate: %v", err)
			}
			if got.verdict != tc.verdict {
				t.Fatalf("verdict %s (%s), want %s", got.verdict, got.why, tc.verdict)
			}
			if tc.verdict == here {
				if got.src.Upper != tc.upper || got.src.Digest != tc.digest || len(got.src.Images) != 1 {
					t.Errorf("source %+v, want upper %s, digest %s, one image", got.src, tc.upper, tc.digest)
				}
			}
			for _, w := range tc.words {
				if !strings.Contains(got.why, w) {
					t.Errorf("reason %q does not say %q", got.why, w)
				}
			}
		})
	}

	// Seen from another node, only what every node can tell is refused.
	other := &locator{kube: l.kube, root: t.TempDir(), node: "node-2", driver: testDriver}
	for _, tc := range []struct {
		vc   *VolumeCommit
		want verdict
	}{
		{podSource("trainer", "data"), notHere},
		{podSource("trainer", "cfg"), notHere},
		{claimSource("clone-claim"), notHere},
		{claimSource("nfs-claim"), refused},
		// Every node can tell that a claim is not the PV's: the first to
		// write the refusal wins.
		{claimSource("steal"), refused},
		{claimSource("binding"), notHere},
	} {
		got, err := other.locate(context.Background(), tc.vc)
		if err != nil || got.verdict != tc.want {
			t.Errorf("node-2 locates %+v: %s (%s), %v; want %s", tc.vc.Spec.Source, got.verdict, got.why, err, tc.want)
		}
	}
}
