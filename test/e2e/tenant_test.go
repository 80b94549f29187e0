//go:build e2e

package e2e

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/driver/commits"
	"github.com/strata-csi/strata/test/testimage"
)

// The tenant scenario's registries, inside the cluster's network namespace:
// team B's private one, and team A's, which lies (200 to every HEAD).
const (
	teamBAddr = "127.0.0.1:5002"
	teamBUser = "team-b"
	teamBPass = "b-s3cret"
	liarAddr  = "127.0.0.1:5003"
)

// serveInNetns serves h on addr inside the cluster's network namespace until
// the test binary exits.
func serveInNetns(t *testing.T, addr string, h http.Handler) {
	t.Helper()
	var ln net.Listener
	err := inNetns(c.netns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in netns %s: %v", addr, c.netns, err)
	}
	go (&http.Server{Handler: h}).Serve(ln)
}

// testTenantIsolation: namespaces team-a and team-b share the node's cache
// and nothing else. B pulls a private image and keeps a clone of the
// dataset; A tries to reach B's data through the cache (B's digest on a
// registry that says yes to every HEAD, a forged manifest listing B's
// layers) and through a VolumeCommit of a claim that names B's volume.
// Each attempt fails with a status that names the reason, and B's
// workloads keep working throughout.
func testTenantIsolation(t *testing.T) {
	a, b := namespace(t, "team-a"), namespace(t, "team-b")
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	serveInNetns(t, teamBAddr, testimage.BasicAuth(teamBUser, teamBPass)(reg))
	serveInNetns(t, liarAddr, testimage.Liar(registry.New(registry.Logger(log.New(io.Discard, "", 0)))))

	bRef := teamBAddr + "/team-b/plans:v1"
	layer := testimage.Layer(t, testimage.Tar(t, testimage.Dir("secret"), testimage.File("secret/plans.txt", "team b plans\n")), testimage.Gzip)
	img := testimage.Image(t, layer)
	digest := testimage.Push(t, bRef, img, remote.WithTransport(netnsTransport()),
		remote.WithAuth(&authn.Basic{Username: teamBUser, Password: teamBPass}))
	blob, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	diffID, err := layer.DiffID()
	if err != nil {
		t.Fatal(err)
	}

	// Team B: its private image, and a clone of the dataset in a claim.
	dockerConfigSecret(t, b, "pull", teamBAddr, teamBUser, teamBPass)
	createPod(t, b, secretPod("b-reader", bRef, "pull", ""))
	p := waitRunning(t, b, "b-reader")
	if out := mustExec(t, b, p.Name, "cat /data/secret/plans.txt"); out != "team b plans\n" {
		t.Fatalf("team B reads %q", out)
	}
	createCloneClass(t)
	apply(t, b, ephemeralClonePod("b-clone"))
	waitRunning(t, b, "b-clone")
	mustExec(t, b, "b-clone", "echo b-only > /data/b-only.txt")
	bPV := boundPV(t, b, "b-clone-data")

	// Team A, 1: B's digest on A's lying registry, no secret.
	trick := liarAddr + "/team-a/x@" + digest.String()
	createPod(t, a, secretPod("digest-trick", trick, "", ""))
	ev := podEvent(t, a, "digest-trick", "FailedMount", "PermissionDenied", "did not serve it")
	t.Logf("digest trick: %s", ev.Message)

	// Team A, 2: a manifest on A's registry whose config lists B's layer.
	forged := liarAddr + "/team-a/forged:v1"
	testimage.Push(t, forged, testimage.ForgedImage(t, []v1.Hash{blob}, []v1.Hash{diffID}), remote.WithTransport(netnsTransport()))
	createPod(t, a, secretPod("forged", forged, "", ""))
	ev = podEvent(t, a, "forged", "FailedMount", "PermissionDenied", "did not serve its blob")
	t.Logf("forged manifest: %s", ev.Message)
	for _, name := range []string{"digest-trick", "forged"} {
		if pod, err := kube.CoreV1().Pods(a).Get(ctx(t), name, metav1.GetOptions{}); err != nil || pod.Status.Phase != corev1.PodPending {
			t.Errorf("team A's pod %s: phase %v, %v; want Pending", name, pod.Status.Phase, err)
		}
	}

	// Team A, 3: a claim in A that names B's PersistentVolume (it stays
	// Pending, but the API accepts it), and a VolumeCommit of that claim.
	apply(t, a, fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: stolen
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: %s
  volumeName: %s
  resources:
    requests:
      storage: %d
`, cloneClass, bPV.Name, cloneSize))
	apply(t, a, fmt.Sprintf(`apiVersion: strata.csi.dev/v1alpha1
kind: VolumeCommit
metadata:
  name: steal
spec:
  source:
    persistentVolumeClaim: stolen
  image: %s/team-a/stolen:v1
`, liarAddr))
	var vc *commits.VolumeCommit
	eventually(t, 2*time.Minute, "VolumeCommit "+a+"/steal over", func() (bool, error) {
		var err error
		vc, err = getVolumeCommit(t, a, "steal")
		return err == nil && vc.Status.Terminal(), err
	})
	if vc.Status.Phase != commits.PhaseFailed || !strings.Contains(vc.Status.Message, "stolen") || !strings.Contains(vc.Status.Message, bPV.Name) {
		t.Errorf("team A's VolumeCommit of a claim naming B's volume: %s %q, want Failed naming the claim and the volume",
			vc.Status.Phase, vc.Status.Message)
	}
	t.Logf("cross-namespace VolumeCommit: %s: %s", vc.Status.Phase, vc.Status.Message)
	if stolen, err := name.ParseReference(liarAddr + "/team-a/stolen:v1"); err != nil {
		t.Fatal(err)
	} else if _, err := remote.Get(stolen, remote.WithTransport(netnsTransport())); err == nil {
		t.Error("team A's registry has a stolen:v1 tag: B's clone was pushed")
	}

	// Team B kept working throughout, and a new pod of B still pulls.
	if out := mustExec(t, b, "b-reader", "cat /data/secret/plans.txt"); out != "team b plans\n" {
		t.Errorf("team B's reader now reads %q", out)
	}
	if out := mustExec(t, b, "b-clone", "cat /data/b-only.txt"); out != "b-only\n" {
		t.Errorf("team B's clone now reads %q", out)
	}
	createPod(t, b, secretPod("b-reader-2", bRef, "pull", ""))
	p = waitRunning(t, b, "b-reader-2")
	if out := mustExec(t, b, p.Name, "cat /data/secret/plans.txt"); out != "team b plans\n" {
		t.Errorf("team B's second reader reads %q", out)
	}
}
