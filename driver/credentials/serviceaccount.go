package credentials

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// syncWait bounds how long publishes wait, after the plugin starts, for the
// service account cache to fill; past it a publish does not wait, and the
// source counts as empty until the cache fills (with a message that says
// so), so that a missing RBAC rule does not slow every publish.
const syncWait = 10 * time.Second

// serviceAccount is the pull secrets source: the imagePullSecrets of one
// ServiceAccount, as a pod of that account would get them. Both the account
// and the secrets are watched through informers, so a publish reads memory,
// and a secret that changes or is newly attached applies to the next
// publish without a restart.
type serviceAccount struct {
	namespace, name string
	accounts        corelisters.ServiceAccountNamespaceLister
	secrets         corelisters.SecretNamespaceLister
	synced          []cache.InformerSynced
	waitUntil       time.Time
	stop            chan struct{}
}

// parseServiceAccount splits "NAMESPACE/NAME".
func parseServiceAccount(s string) (namespace, name string, err error) {
	namespace, name, ok := strings.Cut(s, "/")
	if !ok || namespace == "" || name == "" || strings.Contains(name, "/") {
		return "", "", fmt.Errorf("service account %q: want NAMESPACE/NAME", s)
	}
	return namespace, name, nil
}

// newServiceAccount starts watching the account NAMESPACE/NAME and the
// docker-config secrets of its namespace. The account is watched by name
// (a metadata.name field selector), which RBAC authorizes with a
// resourceNames rule; secrets by type, so that no other secret of the
// namespace is held in memory.
func newServiceAccount(kube kubernetes.Interface, ref string) (*serviceAccount, error) {
	ns, name, err := parseServiceAccount(ref)
	if err != nil {
		return nil, err
	}
	byName := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	byType := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("type", string(corev1.SecretTypeDockerConfigJson)).String()
		}))
	sa := byName.Core().V1().ServiceAccounts()
	sec := byType.Core().V1().Secrets()
	s := &serviceAccount{
		namespace: ns, name: name,
		accounts:  sa.Lister().ServiceAccounts(ns),
		secrets:   sec.Lister().Secrets(ns),
		synced:    []cache.InformerSynced{sa.Informer().HasSynced, sec.Informer().HasSynced},
		stop:      make(chan struct{}),
		waitUntil: time.Now().Add(syncWait),
	}
	byName.Start(s.stop)
	byType.Start(s.stop)
	klog.InfoS("Watching a service account for pull secrets", "serviceAccount", klog.KRef(ns, name))
	return s, nil
}

// String names the account for messages.
func (s *serviceAccount) String() string { return s.namespace + "/" + s.name }

// close stops the informers.
func (s *serviceAccount) close() { close(s.stop) }

// waitSynced waits for the first list of the informers, until ctx ends or
// at most syncWait after the start.
func (s *serviceAccount) waitSynced(ctx context.Context) bool {
	ctx, cancel := context.WithDeadline(ctx, s.waitUntil)
	defer cancel()
	for _, synced := range s.synced {
		if !synced() {
			return cache.WaitForCacheSync(ctx.Done(), s.synced...)
		}
	}
	return true
}

// lookup finds credentials for im among the account's pull secrets. When
// there are none it says why, for the error message.
func (s *serviceAccount) lookup(ctx context.Context, im image) (auth, bool, string) {
	if !s.waitSynced(ctx) {
		return auth{}, false, fmt.Sprintf("service account %s could not be read from the API server yet", s)
	}
	sa, err := s.accounts.Get(s.name)
	if apierrors.IsNotFound(err) {
		return auth{}, false, fmt.Sprintf("service account %s does not exist", s)
	}
	if err != nil {
		return auth{}, false, fmt.Sprintf("service account %s: %v", s, err)
	}
	ring, problems := pullSecretsKeyring(sa, s.secrets.Get, func(name string) string { return "service account secret " + name })
	for _, p := range problems {
		klog.V(2).InfoS("Pull secret of the service account not usable", "serviceAccount", klog.KRef(s.namespace, s.name), "problem", p)
	}
	if a, ok := ring.lookup(im); ok {
		return a, true, ""
	}
	why := fmt.Sprintf("service account %s has no imagePullSecret for it", s)
	if len(problems) > 0 {
		why += " (" + strings.Join(problems, "; ") + ")"
	}
	return auth{}, false, why
}

// pullSecretsKeyring merges the account's imagePullSecrets, in their order,
// into one keyring (so the most specific key wins across secrets, as in
// kubelet), and lists the secrets it could not use. from names a secret as
// the source of credentials in messages.
func pullSecretsKeyring(sa *corev1.ServiceAccount, get func(name string) (*corev1.Secret, error), from func(name string) string) (*keyring, []string) {
	ring := &keyring{}
	var problems []string
	for _, ref := range sa.ImagePullSecrets {
		sec, err := get(ref.Name)
		switch {
		case apierrors.IsNotFound(err):
			problems = append(problems, fmt.Sprintf("secret %s does not exist or is not of type %s", ref.Name, corev1.SecretTypeDockerConfigJson))
			continue
		case err != nil:
			problems = append(problems, fmt.Sprintf("secret %s: %v", ref.Name, err))
			continue
		}
		data, ok := sec.Data[corev1.DockerConfigJsonKey]
		if sec.Type != corev1.SecretTypeDockerConfigJson || !ok {
			problems = append(problems, fmt.Sprintf("secret %s is not a %s secret", ref.Name, corev1.SecretTypeDockerConfigJson))
			continue
		}
		if err := ring.addDockerConfig(data, false, from(ref.Name)); err != nil {
			problems = append(problems, fmt.Sprintf("secret %s: %v", ref.Name, err))
		}
	}
	return ring, problems
}
