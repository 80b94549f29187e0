package credentials

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/validation"
	configv1 "k8s.io/kubelet/config/v1"
	providerv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
)

// podToken is what a provider with tokenAttributes is given for one pod:
// the pod's ServiceAccount token for the provider's audience and the
// annotations of the account it asks for. The zero value is no token (a
// plain provider, or one that runs without a service account).
type podToken struct {
	token       string
	annotations map[string]string
	// cacheKey is the identity dimension of the provider's cache key, as
	// kubelet builds it: the account's namespace, name, UID and the passed
	// annotations, plus a hash of the token for cacheType Token. Empty
	// without a token. It holds no token, only its hash.
	cacheKey string
	// flightKey joins concurrent runs for the same image only when they
	// bring the same token and annotations (kubelet's singleflight key).
	flightKey string
}

// redact removes the token from s (a plugin's stderr that goes into an
// error message).
func (t podToken) redact(s string) string {
	if t.token == "" {
		return s
	}
	return strings.ReplaceAll(s, t.token, "[service account token]")
}

// checkTokenAttributes applies kubelet's validation of tokenAttributes.
func checkTokenAttributes(a configv1.ServiceAccountTokenAttributes) error {
	switch {
	case a.ServiceAccountTokenAudience == "":
		return errors.New("serviceAccountTokenAudience is required")
	case a.RequireServiceAccount == nil:
		return errors.New("requireServiceAccount is required (true or false)")
	case !*a.RequireServiceAccount && len(a.RequiredServiceAccountAnnotationKeys) > 0:
		return errors.New("requiredServiceAccountAnnotationKeys needs requireServiceAccount: true")
	case a.CacheType != configv1.TokenServiceAccountTokenCacheType && a.CacheType != configv1.ServiceAccountServiceAccountTokenCacheType:
		return fmt.Errorf("cacheType %q: want %s or %s", a.CacheType, configv1.TokenServiceAccountTokenCacheType, configv1.ServiceAccountServiceAccountTokenCacheType)
	}
	seen := map[string]string{}
	for _, l := range []struct {
		list string
		keys []string
	}{
		{"requiredServiceAccountAnnotationKeys", a.RequiredServiceAccountAnnotationKeys},
		{"optionalServiceAccountAnnotationKeys", a.OptionalServiceAccountAnnotationKeys},
	} {
		list := l.list
		for _, k := range l.keys {
			if msgs := validation.IsQualifiedName(strings.ToLower(k)); len(msgs) > 0 {
				return fmt.Errorf("%s: %q: %s", list, k, strings.Join(msgs, "; "))
			}
			if other, ok := seen[k]; ok {
				return fmt.Errorf("annotation key %q is listed twice (%s, %s)", k, other, list)
			}
			seen[k] = list
		}
	}
	return nil
}

// tokenFor builds what provider p is given for the pod of acct (nil: the
// pull is for no pod). skip, with a reason, means the provider is not run
// for this pod, as kubelet would not run it; an error means it cannot run
// and says what to fix.
func tokenFor(ctx context.Context, p *provider, acct *podAccount) (id podToken, skip string, err error) {
	attrs := p.tokens
	require := *attrs.RequireServiceAccount
	if acct == nil || !acct.pod.known() {
		if require {
			return podToken{}, fmt.Sprintf("credential provider %s needs a pod's service account, and the pull is for no pod", p.name), nil
		}
		return podToken{}, "", nil // as kubelet runs it for a pod without one
	}
	pod := acct.pod
	token, ok := pod.Tokens[attrs.ServiceAccountTokenAudience]
	if !ok || token == "" {
		if require {
			return podToken{}, "", fmt.Errorf("credential provider %s needs the pod's service account token for audience %q, and kubelet passed none: "+
				"add %q to the chart's podIdentity.audiences (the CSIDriver's tokenRequests)", p.name, attrs.ServiceAccountTokenAudience, attrs.ServiceAccountTokenAudience)
		}
		return podToken{}, "", nil
	}
	uid, annotations, skip, err := accountData(ctx, p, acct)
	if skip != "" || err != nil {
		return podToken{}, skip, err
	}
	tokenHash := digest(token)
	parts := []string{pod.Namespace, pod.ServiceAccount, uid}
	for _, k := range slices.Sorted(maps.Keys(annotations)) {
		parts = append(parts, k, annotations[k])
	}
	// Without the account's UID (no API access) an account deleted and
	// created again under its name would look the same: key by the token
	// then, whatever the cacheType.
	if attrs.CacheType == configv1.TokenServiceAccountTokenCacheType || uid == "" {
		parts = append(parts, "token", tokenHash)
	}
	flight := append([]string{tokenHash}, parts...)
	return podToken{token: token, annotations: annotations, cacheKey: digest(parts...), flightKey: digest(flight...)}, "", nil
}

// accountData reads the UID of the pod's ServiceAccount and the annotations
// the provider asks for. Without API access there is no UID, and a
// provider that asks for annotations cannot run.
func accountData(ctx context.Context, p *provider, acct *podAccount) (uid string, annotations map[string]string, skip string, err error) {
	attrs := p.tokens
	wants := len(attrs.RequiredServiceAccountAnnotationKeys) + len(attrs.OptionalServiceAccountAnnotationKeys)
	sa, err := acct.get(ctx)
	switch {
	case errors.Is(err, errNoAPI) && wants == 0:
		return "", nil, "", nil
	case errors.Is(err, errNoAPI):
		return "", nil, "", fmt.Errorf("credential provider %s needs annotations of the pod's service account %s, and %w", p.name, acct.pod.account(), err)
	case apierrors.IsNotFound(err):
		return "", nil, "", fmt.Errorf("credential provider %s: the pod's service account %s does not exist", p.name, acct.pod.account())
	case err != nil:
		return "", nil, "", fmt.Errorf("credential provider %s: read the pod's service account %s: %w", p.name, acct.pod.account(), err)
	}
	annotations = map[string]string{}
	for _, k := range attrs.RequiredServiceAccountAnnotationKeys {
		v, ok := sa.Annotations[k]
		if !ok {
			// An opt-in by annotation: kubelet skips the provider quietly.
			return "", nil, fmt.Sprintf("credential provider %s needs annotation %s on the pod's service account %s", p.name, k, acct.pod.account()), nil
		}
		annotations[k] = v
	}
	for _, k := range attrs.OptionalServiceAccountAnnotationKeys {
		if v, ok := sa.Annotations[k]; ok {
			annotations[k] = v
		}
	}
	if len(annotations) == 0 {
		annotations = nil
	}
	return string(sa.UID), annotations, "", nil
}

// checkEcho refuses, as kubelet does, an answer whose password is the token
// itself unless the cacheType is Token: cached per account, a pod's token
// would serve the other pods of the account.
func (p *provider) checkEcho(resp *providerv1.CredentialProviderResponse, id podToken) error {
	if id.token == "" || p.tokens.CacheType == configv1.TokenServiceAccountTokenCacheType {
		return nil
	}
	for _, a := range resp.Auth {
		if a.Password == id.token {
			return fmt.Errorf("credential provider %s returned the service account token as the password, which needs tokenAttributes.cacheType: Token", p.name)
		}
	}
	return nil
}

// digest hashes parts, each length-prefixed so that no two lists collide.
func digest(parts ...string) string {
	h := sha256.New()
	for _, s := range parts {
		fmt.Fprintf(h, "%d:%s", len(s), s)
	}
	return hex.EncodeToString(h.Sum(nil))
}
