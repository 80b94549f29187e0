package chart

import (
	"slices"
	"strings"
	"testing"
)

// csiDriverTokens is the part of the CSIDriver that pod identity sets.
type csiDriverTokens struct {
	Spec struct {
		PodInfoOnMount *bool `yaml:"podInfoOnMount"`
		TokenRequests  []struct {
			Audience          string `yaml:"audience"`
			ExpirationSeconds *int64 `yaml:"expirationSeconds"`
		} `yaml:"tokenRequests"`
	} `yaml:"spec"`
}

// withTokenProvider is pod identity with a provider that takes tokens.
const withTokenProvider = `podIdentity:
  enabled: true
  audiences: [registry.example/strata, sts.amazonaws.com]
registries:
  credentialProviders:
    binDir: /opt/bin
    config:
      providers:
        - name: token-exchange
          matchImages: ["registry.example"]
          defaultCacheDuration: 10m
          apiVersion: credentialprovider.kubelet.k8s.io/v1
          tokenAttributes:
            serviceAccountTokenAudience: registry.example/strata
            cacheType: ServiceAccount
            requireServiceAccount: true
            optionalServiceAccountAnnotationKeys: [registry.example/role]
`

// podIdentityRole returns the ClusterRole and binding of pod identity, or
// ok false when there is none.
func podIdentityRole(t *testing.T, objs objects) (role clusterRole, binding clusterRoleBinding, ok bool) {
	t.Helper()
	for _, o := range objs {
		if !strings.HasSuffix(o.Name, "-pod-identity") {
			continue
		}
		switch o.Kind {
		case "ClusterRole":
			o.decode(t, &role)
			ok = true
		case "ClusterRoleBinding":
			o.decode(t, &binding)
		default:
			t.Errorf("unexpected %s %s", o.Kind, o.Name)
		}
	}
	return role, binding, ok
}

// TestPodIdentityOff: by default no tokens are requested, the plugin gets
// no --pod-identity and no RBAC for it; deploy/strata.yaml is the default.
func TestPodIdentityOff(t *testing.T) {
	t.Parallel()
	for name, values := range map[string]string{"default": "", "disabled with audiences": "podIdentity: {enabled: false, audiences: [x]}"} {
		objs := render(t, values)
		var d csiDriverTokens
		objs.one(t, "CSIDriver", &d)
		if len(d.Spec.TokenRequests) != 0 {
			t.Errorf("%s: tokenRequests %+v", name, d.Spec.TokenRequests)
		}
		if _, ok := flags(t, mustContainer(t, objs).Args)["pod-identity"]; ok {
			t.Errorf("%s: --pod-identity given", name)
		}
		if _, _, ok := podIdentityRole(t, objs); ok {
			t.Errorf("%s: the pod identity ClusterRole is rendered", name)
		}
		for _, o := range objs {
			var r clusterRole
			if o.Kind == "ClusterRole" || o.Kind == "Role" {
				o.decode(t, &r)
				for _, rule := range r.Rules {
					if slices.Contains(rule.Resources, "subjectaccessreviews") || slices.Contains(rule.Resources, "serviceaccounts") && len(rule.ResourceNames) == 0 {
						t.Errorf("%s: %s %s grants %+v", name, o.Kind, o.Name, rule)
					}
				}
			}
		}
	}
}

// TestPodIdentity: enabled, the CSIDriver requests a token per audience
// (with no expirationSeconds unless set), keeps podInfoOnMount, the plugin
// gets --pod-identity, and a ClusterRole with exactly what the code calls:
// get serviceaccounts, get secrets, create subjectaccessreviews.
func TestPodIdentity(t *testing.T) {
	t.Parallel()
	objs := render(t, withTokenProvider)
	var d csiDriverTokens
	objs.one(t, "CSIDriver", &d)
	var auds []string
	for _, r := range d.Spec.TokenRequests {
		auds = append(auds, r.Audience)
		if r.ExpirationSeconds != nil {
			t.Errorf("audience %s: expirationSeconds %d, want none (the API server's default)", r.Audience, *r.ExpirationSeconds)
		}
	}
	if want := []string{"registry.example/strata", "sts.amazonaws.com"}; !slices.Equal(auds, want) {
		t.Errorf("tokenRequests audiences %q, want %q", auds, want)
	}
	if d.Spec.PodInfoOnMount == nil || !*d.Spec.PodInfoOnMount {
		t.Error("podInfoOnMount is off: the plugin would not know the pod's namespace and service account")
	}
	if got := flag(t, flags(t, mustContainer(t, objs).Args), "pod-identity"); got != "true" {
		t.Errorf("--pod-identity=%s", got)
	}

	role, binding, ok := podIdentityRole(t, objs)
	if !ok {
		t.Fatalf("no pod identity ClusterRole among %v", objs.kinds())
	}
	var got []string
	for _, r := range role.Rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: want plain resource rules", r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					got = append(got, g+"/"+res+":"+v)
				}
			}
		}
	}
	slices.Sort(got)
	if want := []string{"/secrets:get", "/serviceaccounts:get", "authorization.k8s.io/subjectaccessreviews:create"}; !slices.Equal(got, want) {
		t.Errorf("pod identity grants %q, want exactly %q", got, want)
	}
	var sa struct{}
	saObj := objs.byName(t, "ServiceAccount", "strata-node", &sa)
	if binding.RoleRef.Kind != "ClusterRole" || !strings.HasSuffix(binding.RoleRef.Name, "-pod-identity") ||
		len(binding.Subjects) != 1 || binding.Subjects[0].Name != saObj.Name || binding.Subjects[0].Namespace != releaseNS {
		t.Errorf("binding %+v, want the pod identity ClusterRole bound to the plugin's ServiceAccount only", binding)
	}

	// An explicit lifetime goes to every token request.
	objs = render(t, strings.Replace(withTokenProvider, "podIdentity:\n", "podIdentity:\n  tokenExpirationSeconds: 3600\n", 1))
	objs.one(t, "CSIDriver", &d)
	for _, r := range d.Spec.TokenRequests {
		if r.ExpirationSeconds == nil || *r.ExpirationSeconds != 3600 {
			t.Errorf("audience %s: expirationSeconds %v, want 3600", r.Audience, r.ExpirationSeconds)
		}
	}
}

// TestPodIdentityRejects: bad pod identity values, and token providers
// that kubelet would give no token, fail helm template with a message that
// says what to set.
func TestPodIdentityRejects(t *testing.T) {
	t.Parallel()
	tokenProvider := func(pi, attrs string) string {
		return "podIdentity: " + pi + "\nregistries: {credentialProviders: {binDir: /opt/bin, config: {providers: [{name: p, matchImages: [r.io], " +
			"defaultCacheDuration: 1h, apiVersion: credentialprovider.kubelet.k8s.io/v1, tokenAttributes: {" + attrs + "}}]}}}"
	}
	const attrs = "serviceAccountTokenAudience: r.io, cacheType: Token, requireServiceAccount: true"
	expectRefused(t, []refusal{
		{"short token lifetime", "podIdentity: {enabled: true, audiences: [a], tokenExpirationSeconds: 60}", "tokenExpirationSeconds"},
		{"audiences not a list", "podIdentity: {enabled: true, audiences: a}", "audiences"},
		{"duplicate audience", "podIdentity: {enabled: true, audiences: [a, a]}", "audiences"},
		{"unknown key", "podIdentity: {enabled: true, audience: [a]}", "audience"},
		{"token provider without pod identity", tokenProvider("{enabled: false}", attrs), "podIdentity.enabled=true"},
		{"token provider audience not requested", tokenProvider("{enabled: true, audiences: [other]}", attrs), `"r.io": add it to podIdentity.audiences`},
		{"bad cacheType", tokenProvider("{enabled: true, audiences: [r.io]}", "serviceAccountTokenAudience: r.io, cacheType: Pod, requireServiceAccount: true"), "cacheType"},
		{"no requireServiceAccount", tokenProvider("{enabled: true, audiences: [r.io]}", "serviceAccountTokenAudience: r.io, cacheType: Token"), "requireServiceAccount"},
	})
}
