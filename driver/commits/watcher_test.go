package commits

import (
	"archive/tar"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/test/testimage"
)

// vcObject is a VolumeCommit as the API server would hold it.
func vcObject(t *testing.T, nm string, spec Spec, st Status) *unstructured.Unstructured {
	t.Helper()
	vc := &VolumeCommit{TypeMeta: metav1.TypeMeta{APIVersion: Group + "/" + Version, Kind: Kind},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: nm, UID: types.UID("uid-vc-" + nm), ResourceVersion: "1"},
		Spec:       spec, Status: st}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(vc)
	if err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

// optimisticStatus makes the fake API server do what the real one does
// with an update of the status subresource: refuse it with a conflict
// unless it carries the stored resourceVersion, and bump that version.
func optimisticStatus(client *dynamicfake.FakeDynamicClient) {
	var mu sync.Mutex
	client.PrependReactor("update", Resource, func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		u := a.(k8stesting.UpdateAction).GetObject().(*unstructured.Unstructured)
		cur, err := client.Tracker().Get(GVR, u.GetNamespace(), u.GetName())
		if err != nil {
			return true, nil, err
		}
		have := cur.(*unstructured.Unstructured).GetResourceVersion()
		if u.GetResourceVersion() != have {
			return true, nil, apierrors.NewConflict(schema.GroupResource{Group: Group, Resource: Resource}, u.GetName(),
				errors.New("the object has been modified"))
		}
		n, _ := strconv.Atoi(have)
		u.SetResourceVersion(strconv.Itoa(n + 1))
		return false, nil, nil // the tracker stores it
	})
}

// pushCounter counts manifest PUTs: the pushes a registry received.
type pushCounter struct{ n atomic.Int64 }

func (p *pushCounter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/") {
			p.n.Add(1)
		}
		next.ServeHTTP(w, r)
	})
}

// nodeEnv is one node: its state root, its store, its watcher.
type nodeEnv struct {
	root  string
	store *layercache.Store
}

func newNode(t *testing.T) *nodeEnv {
	t.Helper()
	root := t.TempDir()
	s, err := layercache.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &nodeEnv{root: root, store: s}
}

// publishUpper writes a publish record whose upper holds a new file and
// the deletion of data/b.txt (a 0/0 character device, as overlayfs writes
// it).
func publishUpper(t *testing.T, root, key string, rec state.Record) {
	t.Helper()
	writeRecord(t, root, key, rec)
	upper := state.Upper(root, key)
	if err := os.MkdirAll(filepath.Join(upper, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(upper, "data", "new.txt"), []byte("written by "+key+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(upper, "data", "b.txt"), unix.S_IFCHR, 0); err != nil {
		t.Fatalf("mknod a whiteout (the test needs root): %v", err)
	}
}

// TestWatcher: VolumeCommits end to end, with everything real but the API
// server (client-go's fakes, with the status subresource's optimistic
// concurrency): publish records and uppers in state roots, a layer cache,
// a registry that demands credentials, the credential chain. Two nodes
// watch the same objects; each commit is done once, by the node that holds
// the volume, and a plugin restart neither redoes what is over nor
// forgets what it left Running.
func TestWatcher(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestWatcher needs root: it writes overlayfs whiteouts (character devices 0/0) in the uppers")
	}
	var pushes pushCounter
	addr := testimage.Server(t, func(h http.Handler) http.Handler { return pushes.wrap(testimage.BasicAuth("pusher", "s3cret")(h)) })
	auth := remote.WithAuth(&authn.Basic{Username: "pusher", Password: "s3cret"})
	base := addr + "/team-a/dataset:v1"
	baseDigest := testimage.Push(t, base, testimage.Image(t, testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("data"), testimage.File("data/a.txt", "alpha\n"), testimage.File("data/b.txt", "beta\n")), testimage.Gzip)), auth)
	pushes.n.Store(0)

	n1, n2 := newNode(t), newNode(t)
	rec := func(id, uid, dir string, ro bool) state.Record {
		return state.Record{VolumeID: id, TargetPath: kubeletTarget(uid, dir), Image: base, Digest: baseDigest, ReadOnly: ro, PodUID: uid}
	}
	publishUpper(t, n1.root, "k-trainer", rec("csi-trainer", "uid-trainer", "data", false))
	publishUpper(t, n1.root, "k-reader", rec("csi-reader", "uid-reader", "data", true))
	publishUpper(t, n1.root, "k-crashed", rec("csi-crashed", "uid-crashed", "data", false))
	// The same static PV published read-write on both nodes: both think
	// the claim's VolumeCommit is theirs, and race for it.
	publishUpper(t, n1.root, "k-shared", rec("shared-1", "uid-s1", "pv-shared", false))
	publishUpper(t, n2.root, "k-shared", rec("shared-1", "uid-s2", "pv-shared", false))

	dockerCfg, _ := json.Marshal(map[string]any{"auths": map[string]any{addr: map[string]string{
		"auth": base64.StdEncoding.EncodeToString([]byte("pusher:s3cret"))}}})
	kube := fake.NewClientset(
		testPod("trainer", "uid-trainer", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("reader", "uid-reader", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("crashed", "uid-crashed", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("far", "uid-far", "node-3", corev1.PodRunning, inlineVol("data", testDriver)),
		boundClaim("shared-claim", "pv-shared"), csiPV("pv-shared", testDriver, "shared-1", "shared-claim"),
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "regcred"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: dockerCfg}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "opaque"}, Type: corev1.SecretTypeOpaque},
	)
	pod := func(p string) Source { return Source{Pod: &PodVolume{Name: p, Volume: "data"}} }
	oldDone := Status{Phase: PhaseSucceeded, Node: thisNode, Digest: "sha256:" + strings.Repeat("0", 64), Message: "done before"}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: Kind + "List"},
		vcObject(t, "v2", Spec{Source: pod("trainer"), Image: addr + "/team-a/dataset:v2", PushSecretName: "regcred"}, Status{}),
		vcObject(t, "nocreds", Spec{Source: pod("trainer"), Image: addr + "/team-a/dataset:nocreds"}, Status{}),
		vcObject(t, "badsecret", Spec{Source: pod("trainer"), Image: addr + "/team-a/dataset:bad", PushSecretName: "opaque"}, Status{}),
		vcObject(t, "readonly", Spec{Source: pod("reader"), Image: addr + "/team-a/dataset:ro", PushSecretName: "regcred"}, Status{}),
		vcObject(t, "done", Spec{Source: pod("trainer"), Image: addr + "/team-a/dataset:done", PushSecretName: "regcred"}, oldDone),
		vcObject(t, "crashed", Spec{Source: pod("crashed"), Image: addr + "/team-a/dataset:crashed", PushSecretName: "regcred"},
			Status{Phase: PhaseRunning, Node: thisNode, Message: "committing"}),
		vcObject(t, "race", Spec{Source: Source{PersistentVolumeClaim: "shared-claim"}, Image: addr + "/team-a/dataset:race", PushSecretName: "regcred"}, Status{}),
		vcObject(t, "far", Spec{Source: pod("far"), Image: addr + "/team-a/dataset:far", PushSecretName: "regcred"}, Status{}),
	)
	optimisticStatus(dyn)
	chain, err := credentials.New(credentials.Config{})
	if err != nil {
		t.Fatal(err)
	}
	start := func(n *nodeEnv, node string) (stop func()) {
		w, err := New(Config{Kube: kube, Dynamic: dyn, NodeID: node, DriverName: testDriver, Root: n.root, Store: n.store,
			Credentials: chain, APIWait: 50 * time.Millisecond, Resync: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); w.Run(ctx) }()
		return func() { cancel(); <-done }
	}
	get := func(nm string) *VolumeCommit {
		u, err := dyn.Resource(GVR).Namespace("team-a").Get(context.Background(), nm, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vc, err := fromUnstructured(u)
		if err != nil {
			t.Fatal(err)
		}
		return vc
	}
	terminal := []string{"v2", "nocreds", "badsecret", "readonly", "done", "crashed", "race"}
	waitTerminal := func() {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for _, nm := range terminal {
			for !get(nm).Status.Terminal() {
				if time.Now().After(deadline) {
					t.Fatalf("VolumeCommit %s not over within a minute: %+v", nm, get(nm).Status)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}

	stop1, stop2 := start(n1, thisNode), start(n2, "node-2")
	waitTerminal()
	// Events are sent in the background: look before the watchers stop.
	checkEvents(t, kube, map[string][]string{
		"v2":       {ReasonCommitting, ReasonCommitted},
		"race":     {ReasonCommitting, ReasonCommitted},
		"crashed":  {ReasonCommitting, ReasonCommitted},
		"nocreds":  {ReasonCommitting, ReasonCommitFailed},
		"readonly": {ReasonCommitFailed},
	})

	stop1()
	stop2()

	// v2: pushed with the push secret's credentials; the status tells the
	// digest the registry has for the tag, and what the layer holds.
	v2 := get("v2").Status
	ref, err := name.ParseReference(addr + "/team-a/dataset:v2")
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, auth)
	if err != nil {
		t.Fatalf("the committed image is not in the registry: %v", err)
	}
	d, _ := img.Digest()
	if v2.Phase != PhaseSucceeded || v2.Node != thisNode || v2.Digest != d.String() || v2.ImageRef != addr+"/team-a/dataset@"+d.String() ||
		v2.Files != 1 || v2.Deletions != 1 || v2.LayerBytes <= 0 || v2.UploadedBytes < v2.LayerBytes ||
		v2.StartTime == nil || v2.CompletionTime == nil {
		t.Errorf("v2 status %+v; want Succeeded on %s with digest %s, 1 file, 1 deletion", v2, thisNode, d)
	}
	if got, want := lastLayerNames(t, img), []string{"data/", "data/.wh.b.txt", "data/new.txt"}; !slices.Equal(got, want) {
		t.Errorf("the committed layer holds %q, want %q", got, want)
	}

	// Failures say what to do.
	for nm, words := range map[string][]string{
		"nocreds":   {"spec.pushSecretName", "new VolumeCommit"},
		"badsecret": {"team-a/opaque", "kubernetes.io/dockerconfigjson"},
		"readonly":  {"read-only"},
	} {
		st := get(nm).Status
		if st.Phase != PhaseFailed || st.Node != thisNode || st.CompletionTime == nil {
			t.Errorf("%s: status %+v, want Failed on %s", nm, st, thisNode)
		}
		for _, w := range words {
			if !strings.Contains(st.Message, w) {
				t.Errorf("%s: message %q does not say %q", nm, st.Message, w)
			}
		}
	}
	if st := get("done").Status; st.Digest != oldDone.Digest || st.Message != oldDone.Message {
		t.Errorf("a Succeeded VolumeCommit was redone: %+v", st)
	}
	if st := get("crashed").Status; st.Phase != PhaseSucceeded || st.Node != thisNode || st.Digest == "" {
		t.Errorf("the VolumeCommit left Running by a restart: %+v, want done again and Succeeded", st)
	}
	race := get("race").Status
	t.Logf("v2: %s; race taken by %s; nocreds: %s", v2.Message, race.Node, get("nocreds").Status.Message)
	if race.Phase != PhaseSucceeded || (race.Node != thisNode && race.Node != "node-2") {
		t.Errorf("race: %+v", race)
	}
	if st := get("far").Status; st.Phase != "" {
		t.Errorf("a VolumeCommit of another node's pod was touched: %+v", st)
	}
	// v2, crashed, race: one push each; none for the others.
	if n := pushes.n.Load(); n != 3 {
		t.Errorf("the registry received %d pushes, want 3 (v2, crashed, race: each once)", n)
	}
	// A restart redoes nothing that is over.
	before := map[string]Status{}
	for _, nm := range terminal {
		before[nm] = get(nm).Status
	}
	stop1 = start(n1, thisNode)
	time.Sleep(2 * time.Second) // the first list and a resync
	stop1()
	for _, nm := range terminal {
		if got := get(nm).Status; !equalStatus(got, before[nm]) {
			t.Errorf("%s changed across a restart: %+v -> %+v", nm, before[nm], got)
		}
	}
	if n := pushes.n.Load(); n != 3 {
		t.Errorf("after a restart the registry received %d pushes, want still 3", n)
	}
}

func equalStatus(a, b Status) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// lastLayerNames lists the entries of img's top layer.
func lastLayerNames(t *testing.T, img v1.Image) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil || len(ls) != 2 {
		t.Fatalf("committed image layers: %d, %v; want the base's and the commit's", len(ls), err)
	}
	rc, err := ls[1].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var names []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	slices.Sort(names)
	return names
}

// checkEvents waits until each VolumeCommit has its events' reasons, in
// order (the recorder sends them in the background).
func checkEvents(t *testing.T, kube *fake.Clientset, want map[string][]string) {
	t.Helper()
	var got map[string][]string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		evs, err := kube.CoreV1().Events("team-a").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got = map[string][]string{}
		for _, e := range evs.Items {
			if e.InvolvedObject.Kind != Kind || e.InvolvedObject.APIVersion != Group+"/"+Version {
				t.Fatalf("event %s on %+v", e.Reason, e.InvolvedObject)
			}
			got[e.InvolvedObject.Name] = append(got[e.InvolvedObject.Name], e.Reason)
		}
		ok := true
		for nm, reasons := range want {
			g := slices.Clone(got[nm])
			slices.Sort(g)
			w := slices.Clone(reasons)
			slices.Sort(w)
			ok = ok && slices.Equal(g, w)
		}
		if ok {
			return
		}
	}
	t.Errorf("events by VolumeCommit: got %v, want %v", got, want)
}

// authLog records, per registry request, the method, path and the basic
// auth user it carried ("" when anonymous).
type authLog struct {
	mu   sync.Mutex
	reqs []string // "USER METHOD PATH"
}

func (a *authLog) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, _, _ := r.BasicAuth()
		a.mu.Lock()
		a.reqs = append(a.reqs, u+" "+r.Method+" "+r.URL.Path)
		a.mu.Unlock()
		next.ServeHTTP(w, r)
	})
}

// by lists the requests that carried user's credentials.
func (a *authLog) by(user string) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, r := range a.reqs {
		if strings.HasPrefix(r, user+" ") {
			out = append(out, r)
		}
	}
	return out
}

// dockerConfig is a .dockerconfigjson with user:password for each host.
func dockerConfig(t *testing.T, user, password string, hosts ...string) []byte {
	t.Helper()
	auths := map[string]any{}
	for _, h := range hosts {
		auths[h] = map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}
	}
	data, err := json.Marshal(map[string]any{"auths": auths})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestWatcherPushCredentials: a VolumeCommit pushes with its namespace's
// credentials only. The node's own credentials (here the pull secret of the
// driver's ServiceAccount, through the real credential chain) still read
// the base image, but never reach the target: without a push secret for the
// target's registry, the push is anonymous and the registry refuses it,
// although the node's credentials could have pushed. Two real registries on
// loopback, with basic auth: the base's accepts only the node, the target's
// both the node and the team.
func TestWatcherPushCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestWatcherPushCredentials needs root: it writes overlayfs whiteouts (character devices 0/0) in the uppers")
	}
	var baseLog, targetLog authLog
	baseReg := testimage.Server(t, func(h http.Handler) http.Handler {
		return baseLog.wrap(testimage.BasicAuthUsers(map[string]string{"node": "node-pw"})(h))
	})
	targetReg := testimage.Server(t, func(h http.Handler) http.Handler {
		return targetLog.wrap(testimage.BasicAuthUsers(map[string]string{"node": "node-pw", "team": "team-pw"})(h))
	})
	nodeAuth := remote.WithAuth(&authn.Basic{Username: "node", Password: "node-pw"})
	// Each base holds 256 KiB that do not compress: a copied base shows in
	// the bytes uploaded, a mounted one does not.
	const bigSize = 256 << 10
	baseLayer := func(seed byte) v1.Layer {
		big := make([]byte, bigSize)
		if _, err := rand.NewChaCha8([32]byte{seed}).Read(big); err != nil {
			t.Fatal(err)
		}
		return testimage.Layer(t, testimage.Tar(t, testimage.Dir("data"), testimage.File("data/a.txt", "alpha\n"),
			testimage.File("data/b.txt", "beta\n"), testimage.File("data/big.bin", string(big))), testimage.Gzip)
	}
	base := baseReg + "/library/base:v1"
	baseDigest := testimage.Push(t, base, testimage.Image(t, baseLayer(1)), nodeAuth)
	// Another image on the target's registry: a commit there mounts its
	// layers instead of uploading them.
	sameBase := targetReg + "/library/base:v1"
	sameDigest := testimage.Push(t, sameBase, testimage.Image(t, baseLayer(2)), nodeAuth)
	baseLog.mu.Lock()
	baseLog.reqs = nil
	baseLog.mu.Unlock()
	targetLog.mu.Lock()
	targetLog.reqs = nil
	targetLog.mu.Unlock()

	n := newNode(t)
	publishUpper(t, n.root, "k-trainer", state.Record{VolumeID: "csi-trainer", TargetPath: kubeletTarget("uid-trainer", "data"),
		Image: base, Digest: baseDigest, PodUID: "uid-trainer"})
	publishUpper(t, n.root, "k-local", state.Record{VolumeID: "csi-local", TargetPath: kubeletTarget("uid-local", "data"),
		Image: sameBase, Digest: sameDigest, PodUID: "uid-local"})

	// The driver's ServiceAccount holds the node's credentials, for both
	// registries; the team's secret has the team's, for the target's only.
	const driverNS, driverSA = "kube-system", "strata-node"
	kube := fake.NewClientset(
		testPod("trainer", "uid-trainer", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		testPod("local", "uid-local", thisNode, corev1.PodRunning, inlineVol("data", testDriver)),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: driverNS, Name: driverSA},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "node-pull"}}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: driverNS, Name: "node-pull"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: dockerConfig(t, "node", "node-pw", baseReg, targetReg)}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "teamcred"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: dockerConfig(t, "team", "team-pw", targetReg)}},
		// A push secret for another registry only: it gives the target
		// nothing.
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "elsewhere"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: dockerConfig(t, "team", "team-pw", "registry.invalid")}},
	)
	pod := func(p string) Source { return Source{Pod: &PodVolume{Name: p, Volume: "data"}} }
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: Kind + "List"},
		vcObject(t, "nosecret", Spec{Source: pod("trainer"), Image: targetReg + "/team-a/out:nosecret"}, Status{}),
		vcObject(t, "othersecret", Spec{Source: pod("trainer"), Image: targetReg + "/team-a/out:other", PushSecretName: "elsewhere"}, Status{}),
		vcObject(t, "team", Spec{Source: pod("trainer"), Image: targetReg + "/team-a/out:team", PushSecretName: "teamcred"}, Status{}),
		vcObject(t, "mounted", Spec{Source: pod("local"), Image: targetReg + "/team-a/out:mounted", PushSecretName: "teamcred"}, Status{}),
		// The base's registry is not on the allow-list.
		vcObject(t, "disallowed", Spec{Source: pod("trainer"), Image: baseReg + "/team-a/out:x", PushSecretName: "teamcred"}, Status{}),
	)
	optimisticStatus(dyn)
	chain, err := credentials.New(credentials.Config{Kube: kube, ServiceAccount: driverNS + "/" + driverSA})
	if err != nil {
		t.Fatal(err)
	}
	defer chain.Close()
	w, err := New(Config{Kube: kube, Dynamic: dyn, NodeID: thisNode, DriverName: testDriver, Root: n.root, Store: n.store,
		Credentials: chain, APIWait: 50 * time.Millisecond, Resync: time.Second, AllowedRegistries: []string{targetReg}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	defer func() { cancel(); <-done }()

	get := func(nm string) Status {
		u, err := dyn.Resource(GVR).Namespace("team-a").Get(context.Background(), nm, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vc, err := fromUnstructured(u)
		if err != nil {
			t.Fatal(err)
		}
		return vc.Status
	}
	deadline := time.Now().Add(time.Minute)
	for _, nm := range []string{"nosecret", "othersecret", "team", "mounted", "disallowed"} {
		for !get(nm).Terminal() {
			if time.Now().After(deadline) {
				t.Fatalf("VolumeCommit %s not over within a minute: %+v", nm, get(nm))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	// Without the namespace's credentials for the target, no push, even
	// though the node's credentials would have been accepted.
	for _, nm := range []string{"nosecret", "othersecret"} {
		st := get(nm)
		if st.Phase != PhaseFailed || !strings.Contains(st.Message, "spec.pushSecretName") {
			t.Errorf("%s: status %+v; want Failed, asking for spec.pushSecretName", nm, st)
		}
		t.Logf("%s: %s", nm, st.Message)
	}
	// With them, the push uses them alone; the base is read with the
	// node's credentials.
	for _, nm := range []string{"team", "mounted"} {
		if st := get(nm); st.Phase != PhaseSucceeded {
			t.Errorf("%s: status %+v, want Succeeded", nm, st)
		}
	}
	// The base's layer is mounted from library/base on the target's
	// registry (with the team's credentials), and copied from the other
	// registry (read with the node's).
	if st := get("mounted"); st.UploadedBytes <= 0 || st.UploadedBytes > st.LayerBytes+16<<10 {
		t.Errorf("mounted: %d bytes uploaded for a layer of %d: the base's layers were not mounted", st.UploadedBytes, st.LayerBytes)
	}
	if st := get("team"); st.UploadedBytes < bigSize {
		t.Errorf("team: %d bytes uploaded: the base's %d byte layer was not copied from the other registry", st.UploadedBytes, bigSize)
	}
	t.Logf("uploaded: %d bytes with the base mounted, %d with it copied from another registry", get("mounted").UploadedBytes, get("team").UploadedBytes)
	if st := get("disallowed"); st.Phase != PhaseFailed || !strings.Contains(st.Message, "--commit-allowed-registries") ||
		!strings.Contains(st.Message, targetReg) || !strings.Contains(st.Message, baseReg) {
		t.Errorf("disallowed: status %+v; want Failed, naming the registry and the allow-list", st)
	} else {
		t.Logf("disallowed: %s", st.Message)
	}
	if got := targetLog.by("node"); len(got) > 0 {
		t.Errorf("the target's registry received %d requests with the node's credentials: %q", len(got), got)
	}
	if got := targetLog.by("team"); len(got) == 0 {
		t.Error("the target's registry received no request with the team's credentials")
	}
	if got := baseLog.by("node"); len(got) == 0 {
		t.Error("the base's registry received no request with the node's credentials: the base was not read with them")
	}
	if got := baseLog.by("team"); len(got) > 0 {
		t.Errorf("the base's registry received the team's credentials: %q", got)
	}
	baseLog.mu.Lock()
	for _, r := range baseLog.reqs {
		if !strings.Contains(r, " GET ") && !strings.Contains(r, " HEAD ") {
			t.Errorf("the base's registry, not on the allow-list, received %s", r)
		}
	}
	baseLog.mu.Unlock()
	for _, tag := range []string{"nosecret", "other"} {
		ref, _ := name.ParseReference(targetReg + "/team-a/out:" + tag)
		if _, err := remote.Head(ref, nodeAuth); err == nil {
			t.Errorf("tag %s was pushed", tag)
		}
	}
}

// TestAllowedRegistries: the allow-list matches the target's registry
// exactly, as go-containerregistry names it (docker.io is
// index.docker.io), never by prefix or substring; bad entries are refused
// when the watcher is made.
func TestAllowedRegistries(t *testing.T) {
	s := newNode(t).store
	cfg := func(allowed ...string) Config {
		return Config{Kube: fake.NewClientset(), Dynamic: dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()),
			NodeID: thisNode, DriverName: testDriver, Root: t.TempDir(), Store: s, Credentials: &credentials.Chain{},
			AllowedRegistries: allowed}
	}
	for _, tc := range []struct {
		name    string
		allowed []string
		image   string
		ok      bool
	}{
		{"empty list allows any", nil, "registry.example.com/a/b:v1", true},
		{"exact host", []string{"registry.example.com"}, "registry.example.com/a/b:v1", true},
		{"host and port", []string{"127.0.0.1:5000"}, "127.0.0.1:5000/a:v1", true},
		{"another port", []string{"127.0.0.1:5000"}, "127.0.0.1:50001/a:v1", false},
		{"host without the port", []string{"127.0.0.1"}, "127.0.0.1:5000/a:v1", false},
		{"a longer host", []string{"registry.example.com"}, "registry.example.com.evil.io/a:v1", false},
		{"a parent domain", []string{"example.com"}, "registry.example.com/a:v1", false},
		{"a subdomain entry", []string{"registry.example.com"}, "example.com/registry.example.com/a:v1", false},
		{"docker hub by its short name", []string{"docker.io"}, "library/busybox:v1", true},
		{"docker hub by its index name", []string{"index.docker.io"}, "docker.io/library/busybox:v1", true},
		{"docker hub not listed", []string{"registry.example.com"}, "busybox:v1", false},
		{"case", []string{"Registry.Example.COM"}, "registry.example.com/a:v1", true},
		{"second entry", []string{"a.example", "b.example:443"}, "b.example:443/x:v1", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, err := New(cfg(tc.allowed...))
			if err != nil {
				t.Fatal(err)
			}
			why := w.disallowed(tc.image)
			if (why == "") != tc.ok {
				t.Errorf("%s with allow-list %q: refusal %q, want allowed %t", tc.image, tc.allowed, why, tc.ok)
			}
			if why != "" && !strings.Contains(why, "--commit-allowed-registries") {
				t.Errorf("refusal %q does not name the allow-list", why)
			}
		})
	}
	for _, bad := range []string{"https://registry.example.com", "registry.example.com/team", "", "registry.example.com:port"} {
		if _, err := New(cfg(bad)); err == nil || !strings.Contains(err.Error(), "--commit-allowed-registries") {
			t.Errorf("allow-list entry %q: New gave %v, want an error naming --commit-allowed-registries", bad, err)
		}
	}
}

// TestWatcherNamespaces: with Namespaces, the watcher sees VolumeCommits of
// those namespaces only (so that its RBAC can be Roles in them): one in
// another namespace is never looked at, let alone refused or done.
func TestWatcherNamespaces(t *testing.T) {
	n := newNode(t)
	inB := vcObject(t, "nosource", Spec{Image: "127.0.0.1:1/x:v2"}, Status{})
	inB.SetNamespace("team-b")
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{GVR: Kind + "List"},
		vcObject(t, "nosource", Spec{Image: "127.0.0.1:1/x:v2"}, Status{}), inB)
	optimisticStatus(dyn)
	var mu sync.Mutex
	var seen []string // namespaces of VolumeCommit requests; "" is cluster-wide
	dyn.PrependReactor("*", Resource, func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		seen = append(seen, a.GetNamespace())
		mu.Unlock()
		return false, nil, nil
	})
	dyn.PrependWatchReactor(Resource, func(a k8stesting.Action) (bool, watch.Interface, error) {
		mu.Lock()
		seen = append(seen, a.GetNamespace())
		mu.Unlock()
		return false, nil, nil
	})
	w, err := New(Config{Kube: fake.NewClientset(), Dynamic: dyn, NodeID: thisNode, DriverName: testDriver, Root: n.root, Store: n.store,
		Credentials: &credentials.Chain{}, APIWait: 50 * time.Millisecond, Resync: time.Second, Namespaces: []string{"team-a"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	get := func(ns string) Status {
		u, err := dyn.Resource(GVR).Namespace(ns).Get(context.Background(), "nosource", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vc, err := fromUnstructured(u)
		if err != nil {
			t.Fatal(err)
		}
		return vc.Status
	}
	for deadline := time.Now().Add(30 * time.Second); get("team-a").Phase != PhaseFailed; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the VolumeCommit of team-a was not refused: %+v", get("team-a"))
		}
	}
	time.Sleep(2 * time.Second) // a resync
	cancel()
	<-done
	if st := get("team-b"); st.Phase != "" {
		t.Errorf("the VolumeCommit of team-b, outside Namespaces, was touched: %+v", st)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, ns := range seen[:len(seen)-2] { // the test's own two gets are last
		if ns != "team-a" {
			t.Errorf("the watcher asked for VolumeCommits in namespace %q (\"\": all); want team-a only: %q", ns, seen)
			break
		}
	}
	for _, bad := range [][]string{{"Team-A"}, {""}, {"a/b"}} {
		if _, err := New(Config{Kube: fake.NewClientset(), Dynamic: dyn, NodeID: thisNode, DriverName: testDriver, Root: n.root,
			Store: n.store, Credentials: &credentials.Chain{}, Namespaces: bad}); err == nil || !strings.Contains(err.Error(), "--commit-namespaces") {
			t.Errorf("Namespaces %q: New gave %v, want an error naming --commit-namespaces", bad, err)
		}
	}
}
