//go:build e2e

package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/test/testimage"
)

const (
	privateAddr = "127.0.0.1:5001"
	privateUser = "e2e"
	privatePass = "s3cret"
)

var (
	privateRef = privateAddr + "/private/data:v1"
	// privateDigestRef names the same image by digest (set once pushed).
	privateDigestRef string
)

// secretPod is a pod with an inline volume of image, with a node-publish
// secret (if secret is set) and a pull policy (if policy is set).
func secretPod(name, image, secret, policy string) string {
	return testPod{name: name, image: image, secret: secret, policy: policy}.manifest()
}

func dockerConfigSecret(t *testing.T, ns, name, host, user, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	cfg, err := json.Marshal(map[string]any{"auths": map[string]any{host: map[string]string{"auth": auth}}})
	if err != nil {
		t.Fatal(err)
	}
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Type:       corev1.SecretTypeDockerConfigJson,
		Data:       map[string][]byte{corev1.DockerConfigJsonKey: cfg},
	}
	if _, err := kube.CoreV1().Secrets(ns).Create(ctx(t), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret %s/%s: %v", ns, name, err)
	}
}

// podEvent waits for an event on the pod with reason whose message contains
// every one of want, and returns the event.
func podEvent(t *testing.T, ns, pod, reason string, want ...string) corev1.Event {
	t.Helper()
	var found corev1.Event
	eventually(t, 2*time.Minute, fmt.Sprintf("a %s event on %s/%s containing %q", reason, ns, pod, want), func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
		if err != nil {
			return false, err
		}
		var seen []string
		for _, e := range evs.Items {
			seen = append(seen, e.Reason+": "+e.Message)
			if e.Reason != reason {
				continue
			}
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(e.Message, w)
			}
			if ok {
				found = e
				return true, nil
			}
		}
		return false, fmt.Errorf("events: %q", seen)
	})
	return found
}

// startPrivateRegistry serves a registry behind basic auth inside the
// cluster's network namespace and pushes a private image to it.
func startPrivateRegistry(t *testing.T) {
	t.Helper()
	var ln net.Listener
	err := inNetns(c.netns, func() error {
		var err error
		ln, err = net.Listen("tcp", privateAddr)
		return err
	})
	if err != nil {
		t.Fatalf("private registry listener: %v", err)
	}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	go (&http.Server{Handler: testimage.BasicAuth(privateUser, privatePass)(reg)}).Serve(ln)
	img := testimage.Image(t, testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("secret"),
		testimage.File("secret/plans.txt", "private plans\n"),
	), testimage.Gzip))
	d := testimage.Push(t, privateRef, img, remote.WithTransport(netnsTransport()),
		remote.WithAuth(&authn.Basic{Username: privateUser, Password: privatePass}))
	privateDigestRef = privateAddr + "/private/data@" + d.String()
}

// A private registry (basic auth): the right node-publish secret pulls; a
// wrong one and none are PermissionDenied, the latter naming what is
// missing; the cached image is no way around the registry's credentials,
// even with pullPolicy Never; a pull secret attached to the driver's
// ServiceAccount serves volumes without a secret of their own, without a
// restart of the plugin. The plugin's events tell the pod what happened.
func testPrivateRegistry(t *testing.T) {
	startPrivateRegistry(t)
	ns := namespace(t, "e2e-private")
	dockerConfigSecret(t, ns, "pull-right", privateAddr, privateUser, privatePass)
	dockerConfigSecret(t, ns, "pull-wrong", privateAddr, privateUser, "wrong")

	createPod(t, ns, secretPod("with-secret", privateRef, "pull-right", ""))
	p := waitRunning(t, ns, "with-secret")
	if out := mustExec(t, ns, p.Name, "cat /data/secret/plans.txt"); out != "private plans\n" {
		t.Errorf("private volume reads %q", out)
	}
	ev := podEvent(t, ns, "with-secret", "Pulling", privateRef)
	if ev.Source.Component != driverName || ev.Source.Host != c.nodeName {
		t.Errorf("Pulling event source %+v, want component %s on host %s", ev.Source, driverName, c.nodeName)
	}
	ev = podEvent(t, ns, "with-secret", "Pulled", privateRef, "1 of 1 layers downloaded")
	t.Logf("events: Pulling, then %q", ev.Message)

	createPod(t, ns, secretPod("wrong-secret", privateRef, "pull-wrong", ""))
	ev = podEvent(t, ns, "wrong-secret", "FailedMount", "PermissionDenied", privateRef)
	t.Logf("wrong secret: %s", ev.Message)
	podEvent(t, ns, "wrong-secret", "PullFailed", privateRef)

	// The image is cached now; a volume without credentials still may not
	// use it, under IfNotPresent and Never alike, by tag or by digest.
	for _, policy := range []string{"IfNotPresent", "Never"} {
		name := "no-secret-" + strings.ToLower(policy)
		createPod(t, ns, secretPod(name, privateRef, "", policy))
		createPod(t, ns, secretPod(name+"-digest", privateDigestRef, "", policy))
		podEvent(t, ns, name+"-digest", "FailedMount", "PermissionDenied", "nodePublishSecretRef")
		ev = podEvent(t, ns, name, "FailedMount", "PermissionDenied", "nodePublishSecretRef")
		t.Logf("no secret, %s: %s", policy, ev.Message)
		if p, err := kube.CoreV1().Pods(ns).Get(ctx(t), name, metav1.GetOptions{}); err != nil || p.Status.Phase != corev1.PodPending {
			t.Errorf("%s: phase %v, %v; want Pending", name, p.Status.Phase, err)
		}
	}

	// The driver's pull-secrets ServiceAccount (in its dedicated namespace,
	// which the chart created) gets a pull secret: a volume without one now
	// pulls, and the plugin pod is not restarted for it.
	dockerConfigSecret(t, pullSecretsNS, "e2e-sa-pull", privateAddr, privateUser, privatePass)
	t.Cleanup(func() {
		if out, err := helm("upgrade", release, chartDir(), "--namespace", releaseNS, "--reuse-values",
			"--set", "registries.imagePullSecrets=null", "--wait"); err != nil {
			t.Errorf("helm upgrade (remove the pull secret): %v\n%s", err, out)
		}
		kube.CoreV1().Secrets(pullSecretsNS).Delete(context.Background(), "e2e-sa-pull", metav1.DeleteOptions{})
	})
	before := pluginPod(t)
	if out, err := helm("upgrade", release, chartDir(), "--namespace", releaseNS, "--reuse-values",
		"--set", "registries.imagePullSecrets[0]=e2e-sa-pull", "--wait"); err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	createPod(t, ns, secretPod("via-sa", privateRef, "", ""))
	p = waitRunning(t, ns, "via-sa")
	if out := mustExec(t, ns, p.Name, "cat /data/secret/plans.txt"); out != "private plans\n" {
		t.Errorf("volume pulled with the ServiceAccount's secret reads %q", out)
	}
	if after := pluginPod(t); after.UID != before.UID {
		t.Errorf("the plugin pod was replaced (%s -> %s): a pull secret should apply without a restart", before.Name, after.Name)
	}
	podEvent(t, ns, "via-sa", "Pulled", privateRef, "already cached")

	m := scrapeMetrics(t)
	for _, series := range []string{`strata_registry_errors_total{kind="unauthorized"}`, `strata_pull_duration_seconds_count{result="success"}`} {
		if v, ok := m[series]; !ok || v < 1 {
			t.Errorf("metric %s = %v (present %v), want at least 1", series, v, ok)
		}
	}
}

// scrapeMetrics reads the plugin's /metrics (it listens on the node's
// network, that is inside the cluster's namespace) into series -> value.
func scrapeMetrics(t *testing.T) map[string]float64 {
	t.Helper()
	resp, err := (&http.Client{Transport: netnsTransport(), Timeout: 10 * time.Second}).Get("http://127.0.0.1:9809/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndex(line, " ")
		var v float64
		if _, err := fmt.Sscan(line[i+1:], &v); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}
