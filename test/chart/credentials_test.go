package chart

import (
	"path"
	"slices"
	"strings"
	"testing"

	configv1 "k8s.io/kubelet/config/v1"
	"sigs.k8s.io/yaml"
)

// withProviders turns on every pull credential option: a pull secret on the
// plugin's ServiceAccount and a kubelet credential provider.
const withProviders = `registries:
  insecure: [registry.local:5000]
  imagePullSecrets: [corp-pull, team-pull]
  credentialProviders:
    config:
      providers:
        - name: ecr-credential-provider
          matchImages: ["*.dkr.ecr.*.amazonaws.com", "registry.io:8080/path"]
          defaultCacheDuration: 12h
          apiVersion: credentialprovider.kubelet.k8s.io/v1
          args: [get-credentials]
          env: [{name: AWS_REGION, value: us-east-1}]
    binDir: /etc/eks/image-credential-provider
`

// pullSecretsRole returns the Role and RoleBinding of the pull secrets
// source, failing unless there is exactly one of each.
func pullSecretsRole(t *testing.T, objs objects) (object, clusterRole, clusterRoleBinding) {
	t.Helper()
	var role clusterRole
	var binding clusterRoleBinding
	mine := objs.named("strata-node-pull-secrets")
	o := mine.one(t, "Role", &role)
	b := mine.one(t, "RoleBinding", &binding)
	if b.Namespace != o.Namespace {
		t.Errorf("RoleBinding in %q, Role in %q", b.Namespace, o.Namespace)
	}
	return o, role, binding
}

// TestPullSecretsServiceAccount: by default the plugin reads the pull
// secrets of the chart's own pull-secrets ServiceAccount, in a dedicated
// namespace, with a Role there that allows exactly that: list/watch of that
// one ServiceAccount (by name) and of secrets; another account gets the
// Role in its namespace; disabled, there is neither flag nor Role.
func TestPullSecretsServiceAccount(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, values, namespace, account string
	}{
		{"default", "", pullSecretsNS, "strata-pull-secrets"},
		{"another namespace", "registries: {pullSecretsServiceAccount: {enabled: true, namespace: pulls}}", "pulls", "strata-pull-secrets"},
		{"name in the pull secrets namespace", "registries: {pullSecretsServiceAccount: {enabled: true, name: robot}}", pullSecretsNS, "robot"},
		{"namespace and name", "registries: {pullSecretsServiceAccount: {enabled: true, name: pulls/robot}}", "pulls", "robot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			objs := render(t, tc.values)
			_, c := nodePlugin(t, objs)
			if got, want := flag(t, flags(t, c.Args), "pull-secrets-service-account"), tc.namespace+"/"+tc.account; got != want {
				t.Errorf("--pull-secrets-service-account=%s, want %s", got, want)
			}
			o, role, binding := pullSecretsRole(t, objs)
			if o.Namespace != tc.namespace {
				t.Errorf("Role in namespace %q, want %q (the account's)", o.Namespace, tc.namespace)
			}
			checkPullSecretsRules(t, role.Rules, tc.account)
			var sa struct{}
			saObj := objs.byName(t, "ServiceAccount", "strata-node", &sa)
			if binding.RoleRef.Kind != "Role" || binding.RoleRef.Name != o.Name {
				t.Errorf("binding refers to %s %s, want Role %s", binding.RoleRef.Kind, binding.RoleRef.Name, o.Name)
			}
			if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" ||
				binding.Subjects[0].Name != saObj.Name || binding.Subjects[0].Namespace != releaseNS {
				t.Errorf("binding subjects %+v, want only the plugin's ServiceAccount %s/%s", binding.Subjects, releaseNS, saObj.Name)
			}
		})
	}
	t.Run("disabled", func(t *testing.T) {
		t.Parallel()
		objs := render(t, "registries: {pullSecretsServiceAccount: {enabled: false}}")
		if _, ok := flags(t, mustContainer(t, objs).Args)["pull-secrets-service-account"]; ok {
			t.Error("--pull-secrets-service-account given while disabled")
		}
		for _, o := range objs.withoutController() {
			// The storage capacity's Role (storageCapacity.enabled) is
			// the only other Role of the node plugin.
			if (o.Kind == "Role" || o.Kind == "RoleBinding") && o.Name != "strata-node-capacity" {
				t.Errorf("%s %s is rendered while the source is disabled", o.Kind, o.Name)
			}
		}
	})
}

func mustContainer(t *testing.T, objs objects) container {
	t.Helper()
	_, c := nodePlugin(t, objs)
	return c
}

// checkPullSecretsRules: read-only, core group, the ServiceAccount by name,
// secrets, nothing else.
func checkPullSecretsRules(t *testing.T, rules []policyRule, account string) {
	t.Helper()
	got := map[string]policyRule{}
	for _, r := range rules {
		if !slices.Equal(r.APIGroups, []string{""}) || len(r.Resources) != 1 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: want one core resource per rule", r)
			continue
		}
		// Informers only: list and watch, never get.
		if v := slices.Clone(r.Verbs); !slices.Equal(slices.Sorted(slices.Values(v)), []string{"list", "watch"}) {
			t.Errorf("rule %+v grants verbs %q, want list, watch", r, r.Verbs)
		}
		got[r.Resources[0]] = r
	}
	if len(got) != 2 {
		t.Errorf("rules cover %d resources, want serviceaccounts and secrets: %+v", len(got), rules)
	}
	if sa, ok := got["serviceaccounts"]; !ok || !slices.Equal(sa.ResourceNames, []string{account}) {
		t.Errorf("serviceaccounts rule %+v, want resourceNames [%s]", sa, account)
	}
	if _, ok := got["secrets"]; !ok {
		t.Error("no rule for secrets")
	}
}

// TestImagePullSecrets: registries.imagePullSecrets are attached to the
// chart's pull-secrets ServiceAccount in its dedicated namespace, not to the
// plugin's own; they need that account (not one of the user's).
func TestImagePullSecrets(t *testing.T) {
	t.Parallel()
	type account struct {
		Metadata struct {
			Namespace string `yaml:"namespace"`
		} `yaml:"metadata"`
		AutomountServiceAccountToken *bool `yaml:"automountServiceAccountToken"`
		ImagePullSecrets             []struct {
			Name string `yaml:"name"`
		} `yaml:"imagePullSecrets"`
	}
	objs := render(t, withProviders)
	var pull, node account
	objs.byName(t, "ServiceAccount", "strata-pull-secrets", &pull)
	objs.byName(t, "ServiceAccount", "strata-node", &node)
	var names []string
	for _, s := range pull.ImagePullSecrets {
		names = append(names, s.Name)
	}
	if want := []string{"corp-pull", "team-pull"}; !slices.Equal(names, want) || pull.Metadata.Namespace != pullSecretsNS {
		t.Errorf("pull-secrets account in %q with imagePullSecrets %q, want %q in %s", pull.Metadata.Namespace, names, want, pullSecretsNS)
	}
	if pull.AutomountServiceAccountToken == nil || *pull.AutomountServiceAccountToken {
		t.Error("the pull-secrets account mounts tokens: no pod runs as it")
	}
	if len(node.ImagePullSecrets) != 0 {
		t.Errorf("the plugin's own ServiceAccount carries imagePullSecrets %v", node.ImagePullSecrets)
	}
	pull.ImagePullSecrets = nil
	render(t, "").byName(t, "ServiceAccount", "strata-pull-secrets", &pull)
	if len(pull.ImagePullSecrets) != 0 {
		t.Errorf("imagePullSecrets %v by default", pull.ImagePullSecrets)
	}
	expectRefused(t, []refusal{
		{"imagePullSecrets with an account of the user's", "registries: {imagePullSecrets: [a], pullSecretsServiceAccount: {enabled: true, name: robot}}", "imagePullSecrets"},
		{"imagePullSecrets with the source off", "registries: {imagePullSecrets: [a], pullSecretsServiceAccount: {enabled: false}}", "imagePullSecrets"},
	})
}

// TestPullSecretsNamespace: the chart creates the dedicated namespace,
// kept by helm uninstall (it holds secrets the chart did not create),
// unless told not to, or when it is the release's own, or when the account
// is the user's.
func TestPullSecretsNamespace(t *testing.T) {
	t.Parallel()
	var ns struct {
		Metadata struct {
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"metadata"`
	}
	render(t, "").byName(t, "Namespace", pullSecretsNS, &ns)
	if ns.Metadata.Annotations["helm.sh/resource-policy"] != "keep" {
		t.Errorf("namespace %s annotations %v: want helm.sh/resource-policy keep", pullSecretsNS, ns.Metadata.Annotations)
	}
	for _, values := range []string{
		"registries: {pullSecretsServiceAccount: {enabled: true, createNamespace: false}}",
		"registries: {pullSecretsServiceAccount: {enabled: true, namespace: " + releaseNS + "}}",
		"registries: {pullSecretsServiceAccount: {enabled: true, name: pulls/robot}}",
		"registries: {pullSecretsServiceAccount: {enabled: false}}",
	} {
		if k := render(t, values).kinds(); slices.Contains(k, "Namespace") {
			t.Errorf("values %q render a Namespace", values)
		}
	}
}

// podVolumes are the DaemonSet's volumes with their ConfigMap sources.
type podVolumes struct {
	Spec struct {
		Template struct {
			Metadata struct {
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec struct {
				Volumes []struct {
					Name      string `yaml:"name"`
					ConfigMap *struct {
						Name string `yaml:"name"`
					} `yaml:"configMap"`
				} `yaml:"volumes"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

// TestCredentialProviders: the providers become a ConfigMap in kubelet's
// CredentialProviderConfig format (decoded strictly into kubelet's own
// type), mounted where --image-credential-provider-config points; binDir is
// a read-only hostPath where --image-credential-provider-bin-dir points;
// the pods carry a checksum so that a change rolls them.
func TestCredentialProviders(t *testing.T) {
	t.Parallel()
	objs := render(t, withProviders)
	ds, c := nodePlugin(t, objs)
	f := flags(t, c.Args)

	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	var cmObj object
	for _, o := range objs {
		if o.Kind == "ConfigMap" && strings.HasSuffix(o.Name, "-credential-providers") {
			o.decode(t, &cm)
			cmObj = o
		}
	}
	if cmObj.Name == "" {
		t.Fatalf("no ConfigMap *-credential-providers among %v", objs.kinds())
	}
	var cfg configv1.CredentialProviderConfig
	if err := yaml.UnmarshalStrict([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatalf("config.yaml is not kubelet's format: %v\n%s", err, cm.Data["config.yaml"])
	}
	if cfg.APIVersion != "kubelet.config.k8s.io/v1" || cfg.Kind != "CredentialProviderConfig" || len(cfg.Providers) != 1 {
		t.Fatalf("config %s %s with %d providers", cfg.APIVersion, cfg.Kind, len(cfg.Providers))
	}
	p := cfg.Providers[0]
	if p.Name != "ecr-credential-provider" || p.DefaultCacheDuration.Duration.Hours() != 12 ||
		!slices.Equal(p.MatchImages, []string{"*.dkr.ecr.*.amazonaws.com", "registry.io:8080/path"}) ||
		!slices.Equal(p.Args, []string{"get-credentials"}) || len(p.Env) != 1 || p.Env[0].Value != "us-east-1" {
		t.Errorf("provider %+v does not carry the values", p)
	}

	// The config flag names config.yaml in the ConfigMap's mount.
	cfgFlag := flag(t, f, "image-credential-provider-config")
	if path.Base(cfgFlag) != "config.yaml" {
		t.Errorf("--image-credential-provider-config=%s, want .../config.yaml", cfgFlag)
	}
	var pv podVolumes
	objs.one(t, "DaemonSet", &pv)
	var mounted bool
	for _, m := range c.VolumeMounts {
		if m.MountPath != path.Dir(cfgFlag) {
			continue
		}
		for _, v := range pv.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.ConfigMap != nil && v.ConfigMap.Name == cmObj.Name {
				mounted = m.ReadOnly
			}
		}
	}
	if !mounted {
		t.Errorf("ConfigMap %s is not mounted read-only at %s", cmObj.Name, path.Dir(cfgFlag))
	}
	binFlag := flag(t, f, "image-credential-provider-bin-dir")
	host, typ, _ := mountOf(t, ds.Spec.Template.Spec, c, binFlag)
	if host != "/etc/eks/image-credential-provider" || typ != "Directory" {
		t.Errorf("--image-credential-provider-bin-dir=%s is hostPath %s (%s), want /etc/eks/image-credential-provider (Directory)", binFlag, host, typ)
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == binFlag && !m.ReadOnly {
			t.Error("the plugins' directory is mounted writable")
		}
	}
	sum := pv.Spec.Template.Metadata.Annotations["strata.csi.dev/credential-providers-checksum"]
	if sum == "" {
		t.Error("no checksum annotation: a changed provider config would not reach the running plugins")
	}

	// Off by default: no ConfigMap, no flags, no annotation.
	objs = render(t, "")
	for _, o := range objs {
		if o.Kind == "ConfigMap" && strings.HasSuffix(o.Name, "-credential-providers") {
			t.Errorf("ConfigMap %s rendered by default", o.Name)
		}
	}
	f = flags(t, mustContainer(t, objs).Args)
	for _, name := range []string{"image-credential-provider-config", "image-credential-provider-bin-dir"} {
		if _, ok := f[name]; ok {
			t.Errorf("--%s given by default", name)
		}
	}
}

// TestCredentialSchemaRejects: bad pull credential values fail helm
// template with a message naming them.
func TestCredentialSchemaRejects(t *testing.T) {
	t.Parallel()
	provider := func(fields string) string {
		return "registries: {credentialProviders: {binDir: /opt/bin, config: {providers: [{" + fields + "}]}}}"
	}
	const good = "name: p, matchImages: [r.io], defaultCacheDuration: 1h, apiVersion: credentialprovider.kubelet.k8s.io/v1"
	expectRefused(t, []refusal{
		{"providers without binDir", "registries: {credentialProviders: {config: {providers: [{" + good + "}]}}}", "binDir"},
		{"relative binDir", "registries: {credentialProviders: {binDir: opt/bin}}", "binDir"},
		{"provider apiVersion", provider("name: p, matchImages: [r.io], defaultCacheDuration: 1h, apiVersion: credentialprovider.kubelet.k8s.io/v1alpha1"), "apiVersion"},
		{"provider without matchImages", provider("name: p, defaultCacheDuration: 1h, apiVersion: credentialprovider.kubelet.k8s.io/v1"), "matchImages"},
		{"provider cache duration", provider("name: p, matchImages: [r.io], defaultCacheDuration: forever, apiVersion: credentialprovider.kubelet.k8s.io/v1"), "defaultCacheDuration"},
		{"provider name with a slash", provider("name: ../p, matchImages: [r.io], defaultCacheDuration: 1h, apiVersion: credentialprovider.kubelet.k8s.io/v1"), "name"},
		{"unknown provider key", provider(good + ", tokenAttribute: {}"), "tokenAttribute"},
		{"service account name", "registries: {pullSecretsServiceAccount: {enabled: true, name: a/b/c}}", "name"},
		{"service account as a string", "registries: {pullSecretsServiceAccount: strata-node}", "pullSecretsServiceAccount"},
		{"pull secrets namespace", "registries: {pullSecretsServiceAccount: {enabled: true, namespace: Bad_NS}}", "namespace"},
		{"imagePullSecrets not a list", "registries: {imagePullSecrets: corp-pull}", "imagePullSecrets"},
	})
}
