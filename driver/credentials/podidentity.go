package credentials

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
)

// DefaultAccessReviewTTL is how long the answer of a SubjectAccessReview
// (may this pod's ServiceAccount get that secret?) is reused. Short, so that
// a revoked RoleBinding stops a secret's use within seconds; long enough
// that a burst of publishes for one workload (a Deployment scaling up)
// asks the API server once per secret, not once per pod. The API server's
// own webhook authorizer caches its answers in the same way.
const DefaultAccessReviewTTL = 10 * time.Second

// Pod is the pod a publish is for, as kubelet describes it in the volume
// context (the CSIDriver's podInfoOnMount and tokenRequests). It is the
// identity of the pod identity sources. The zero value is no pod: a
// prepull, or a CSIDriver without podInfoOnMount.
type Pod struct {
	Namespace, Name, UID string
	// ServiceAccount is the name of the pod's ServiceAccount, in Namespace.
	ServiceAccount string
	// Tokens are the pod's ServiceAccount tokens by audience. They go only
	// to the credential providers whose tokenAttributes ask for that
	// audience, and are never logged, stored or put in a message.
	Tokens map[string]string
}

// String names the pod and its account, never its tokens, so that a Pod
// printed by mistake shows no secret.
func (p Pod) String() string {
	if p.ServiceAccount == "" {
		return "no pod"
	}
	return fmt.Sprintf("pod %s/%s (service account %s, %d tokens)", p.Namespace, p.Name, p.ServiceAccount, len(p.Tokens))
}

// account is "NAMESPACE/NAME" of the pod's ServiceAccount.
func (p Pod) account() string { return p.Namespace + "/" + p.ServiceAccount }

// known reports whether kubelet told which ServiceAccount the pod runs as.
func (p Pod) known() bool { return p.Namespace != "" && p.ServiceAccount != "" }

// podAccount fetches the pod's ServiceAccount from the API server at most
// once per Chain.For: both pod identity sources need it (its
// imagePullSecrets; its UID and annotations for token providers).
type podAccount struct {
	kube    kubernetes.Interface // nil: no API access
	pod     Pod
	fetched bool
	sa      *corev1.ServiceAccount
	err     error
}

// get returns the pod's ServiceAccount.
func (a *podAccount) get(ctx context.Context) (*corev1.ServiceAccount, error) {
	if a.kube == nil {
		return nil, errNoAPI
	}
	if !a.fetched {
		a.fetched = true
		a.sa, a.err = a.kube.CoreV1().ServiceAccounts(a.pod.Namespace).Get(ctx, a.pod.ServiceAccount, metav1.GetOptions{})
	}
	return a.sa, a.err
}

// errNoAPI: the plugin runs without a Kubernetes API client.
var errNoAPI = errors.New("the plugin has no Kubernetes API access")

// podSecrets is the source of the pod's own ServiceAccount's
// imagePullSecrets. Unlike kubelet, which reads any secret a pod names, the
// plugin holds get on every secret of the cluster, so it must not act on a
// name alone: a secret is read only after a SubjectAccessReview shows that
// the pod's ServiceAccount may get it itself. The plugin thus gives a pod no
// secret that the pod could not read through the API with its own token.
type podSecrets struct {
	kube   kubernetes.Interface
	access *accessCache
}

// lookup finds credentials for im among the pod's ServiceAccount's
// imagePullSecrets that the account may read. denied names the secrets it
// may not, for the message should the registry refuse.
func (s *podSecrets) lookup(ctx context.Context, im image, acct *podAccount) (a auth, ok bool, why string, denied []string) {
	pod := acct.pod
	sa, err := acct.get(ctx)
	switch {
	case apierrors.IsNotFound(err):
		return auth{}, false, fmt.Sprintf("the pod's service account %s does not exist", pod.account()), nil
	case err != nil:
		return auth{}, false, fmt.Sprintf("the pod's service account %s cannot be read: %v", pod.account(), err), nil
	}
	logger := klog.FromContext(ctx)
	get := func(name string) (*corev1.Secret, error) {
		allowed, err := s.access.allowed(ctx, s.kube, pod.Namespace, pod.ServiceAccount, name)
		if err != nil {
			return nil, fmt.Errorf("cannot check whether the service account may get it: %w", err)
		}
		if !allowed {
			logger.Info("Pull secret not used: the pod's service account may not get it",
				"serviceAccount", klog.KRef(pod.Namespace, pod.ServiceAccount), "secret", name)
			denied = append(denied, name)
			return nil, errDenied
		}
		return s.kube.CoreV1().Secrets(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	}
	ring, problems := pullSecretsKeyring(sa, get, func(name string) string {
		return fmt.Sprintf("secret %s of the pod's service account %s", name, pod.account())
	})
	for _, p := range problems {
		logger.V(2).Info("Pull secret of the pod's service account not usable", "serviceAccount", klog.KRef(pod.Namespace, pod.ServiceAccount), "problem", p)
	}
	if a, ok := ring.lookup(im); ok {
		return a, true, "", denied
	}
	why = fmt.Sprintf("the pod's service account %s has no imagePullSecret for it that it may read", pod.account())
	if len(problems) > 0 {
		why += " (" + strings.Join(problems, "; ") + ")"
	}
	return auth{}, false, why, denied
}

// errDenied: a SubjectAccessReview denied the pod's ServiceAccount get on a
// secret.
var errDenied = errors.New("the pod's service account may not get it (SubjectAccessReview denied): grant it get on the secret with a Role and RoleBinding")

// accessCache keeps SubjectAccessReview answers for a short while, per
// (namespace, service account, secret).
type accessCache struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	answers map[accessKey]accessAnswer
}

type accessKey struct{ namespace, account, secret string }

type accessAnswer struct {
	allowed bool
	expires time.Time
}

func newAccessCache(ttl time.Duration) *accessCache {
	if ttl <= 0 {
		ttl = DefaultAccessReviewTTL
	}
	return &accessCache{ttl: ttl, now: time.Now, answers: map[accessKey]accessAnswer{}}
}

// allowed reports whether the ServiceAccount namespace/account may get the
// secret of its namespace, asking the API server unless a recent answer is
// cached. Errors are not cached.
func (c *accessCache) allowed(ctx context.Context, kube kubernetes.Interface, namespace, account, secret string) (bool, error) {
	k := accessKey{namespace, account, secret}
	c.mu.Lock()
	a, ok := c.answers[k]
	now := c.now()
	if ok && now.After(a.expires) {
		delete(c.answers, k)
		ok = false
	}
	c.mu.Unlock()
	if ok {
		return a.allowed, nil
	}
	allowed, err := reviewSecretAccess(ctx, kube, namespace, account, secret)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	c.answers[k] = accessAnswer{allowed: allowed, expires: now.Add(c.ttl)}
	c.mu.Unlock()
	return allowed, nil
}

// reviewSecretAccess asks the API server whether the ServiceAccount
// namespace/account may get secret in its namespace, as the account itself
// would be authorized: its user name and its two service account groups.
// system:authenticated is left out on purpose: a grant to every
// authenticated user does not make a secret the pod's.
func reviewSecretAccess(ctx context.Context, kube kubernetes.Interface, namespace, account, secret string) (bool, error) {
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   "system:serviceaccount:" + namespace + ":" + account,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: namespace, Verb: "get", Resource: "secrets", Name: secret,
		},
	}}
	resp, err := kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		return false, fmt.Errorf("SubjectAccessReview for %s/%s on secret %s: %w", namespace, account, secret, err)
	}
	return resp.Status.Allowed && !resp.Status.Denied, nil
}
