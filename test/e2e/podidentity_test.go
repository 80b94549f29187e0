//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// identityPod is a pod that runs as ServiceAccount sa and mounts image as
// an inline volume without a nodePublishSecretRef: its pull credentials can
// only come from its own identity.
func identityPod(name, sa, image string) string {
	return testPod{name: name, image: image, serviceAccount: sa}.manifest()
}

// pullAccount creates ServiceAccount ns/name whose imagePullSecrets are
// secrets.
func pullAccount(t *testing.T, ns, name string, secrets ...string) {
	t.Helper()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	for _, s := range secrets {
		sa.ImagePullSecrets = append(sa.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
	}
	if _, err := kube.CoreV1().ServiceAccounts(ns).Create(ctx(t), sa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account %s/%s: %v", ns, name, err)
	}
}

// allowSecretGet lets ServiceAccount ns/account get secret ns/secret (by
// name), with a Role and RoleBinding: what a namespace's owner grants to
// let a pod pull with a pull secret through pod identity.
func allowSecretGet(t *testing.T, ns, account, secret string) {
	t.Helper()
	name := account + "-get-" + secret
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{secret}, Verbs: []string{"get"}}},
	}
	if _, err := kube.RbacV1().Roles(ns).Create(ctx(t), role, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role %s/%s: %v", ns, name, err)
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: account, Namespace: ns}},
	}
	if _, err := kube.RbacV1().RoleBindings(ns).Create(ctx(t), binding, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create role binding %s/%s: %v", ns, name, err)
	}
}

// setPodIdentity turns the chart's podIdentity on or off and waits for the
// plugin to be ready again (the DaemonSet rolls: its flags change).
func setPodIdentity(t *testing.T, on bool) error {
	t.Helper()
	out, err := helm("upgrade", release, chartDir(), "--namespace", releaseNS, "--reuse-values",
		"--set", fmt.Sprintf("podIdentity.enabled=%v", on), "--wait", "--timeout", "3m")
	if err != nil {
		return fmt.Errorf("helm upgrade podIdentity.enabled=%v: %v\n%s", on, err, out)
	}
	return nil
}

// Pod identity (chart value podIdentity.enabled): a pod without a
// nodePublishSecretRef pulls a private image with its own ServiceAccount's
// imagePullSecret, once the account may get that secret (a Role grants it);
// a ServiceAccount that names a secret it may not get, even one that exists
// in its namespace with the right credentials, gets PermissionDenied naming
// the secret; a ServiceAccount that names a secret of another namespace
// gets nothing from it, even with a Role for that name in its own: the
// plugin looks in the pod's namespace only. Runs after testPrivateRegistry,
// whose private registry (privateAddr, privateRef) it pulls from, and whose
// cleanup removed the driver ServiceAccount's pull secret.
func testPodIdentity(t *testing.T) {
	if err := setPodIdentity(t, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := setPodIdentity(t, false); err != nil {
			t.Error(err)
		}
	})
	waitPluginReady(t)

	// Namespace A: the account's pull secret, readable by the account.
	nsA := namespace(t, "e2e-podid-a")
	dockerConfigSecret(t, nsA, "pull-a", privateAddr, privateUser, privatePass)
	dockerConfigSecret(t, nsA, "only-in-a", privateAddr, privateUser, privatePass)
	pullAccount(t, nsA, "puller", "pull-a")
	allowSecretGet(t, nsA, "puller", "pull-a")
	createPod(t, nsA, identityPod("own-identity", "puller", privateRef))
	p := waitRunning(t, nsA, "own-identity")
	if out := mustExec(t, nsA, p.Name, "cat /data/secret/plans.txt"); out != "private plans\n" {
		t.Errorf("volume pulled with the pod's own pull secret reads %q", out)
	}
	// The plugin runs with --v=4: it names the source it chose.
	if out, _ := kubectl("-n", releaseNS, "logs", "-l", "app.kubernetes.io/component=node", "--tail=-1"); !strings.Contains(out, "secret pull-a of the pod's service account "+nsA+"/puller") {
		t.Errorf("the plugin log does not say the credentials came from %s/pull-a", nsA)
	}

	// Namespace B: the same secret name, with the right credentials, exists
	// in B, but B's account may not get it: the plugin must not read it.
	nsB := namespace(t, "e2e-podid-b")
	dockerConfigSecret(t, nsB, "pull-a", privateAddr, privateUser, privatePass)
	pullAccount(t, nsB, "borrower", "pull-a")
	createPod(t, nsB, identityPod("borrowed", "borrower", privateRef))
	ev := podEvent(t, nsB, "borrowed", "FailedMount", "PermissionDenied", privateRef, "secret pull-a", "may not get it")
	t.Logf("borrowed secret: %s", ev.Message)

	// A name that exists only in A, with get on that name granted in B:
	// looked up in B, where it does not exist, never in A.
	pullAccount(t, nsB, "crosser", "only-in-a")
	allowSecretGet(t, nsB, "crosser", "only-in-a")
	createPod(t, nsB, identityPod("cross-namespace", "crosser", privateRef))
	ev = podEvent(t, nsB, "cross-namespace", "FailedMount", "PermissionDenied", privateRef, "secret only-in-a does not exist")
	t.Logf("secret of another namespace: %s", ev.Message)
	for _, name := range []string{"borrowed", "cross-namespace"} {
		if p, err := kube.CoreV1().Pods(nsB).Get(ctx(t), name, metav1.GetOptions{}); err != nil || p.Status.Phase != corev1.PodPending {
			t.Errorf("%s: phase %v, %v; want Pending", name, p.Status.Phase, err)
		}
	}
}
