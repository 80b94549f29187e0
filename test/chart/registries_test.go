package chart

import (
	"slices"
	"testing"

	"github.com/strata-csi/strata/layercache/registryconf"
)

// registryPod is the part of the DaemonSet's pod that the registry config
// touches: the volumes (ConfigMap and Secret sources) and the mounts.
type registryPod struct {
	Spec struct {
		Template struct {
			Spec struct {
				Containers []struct {
					Args         []string `yaml:"args"`
					VolumeMounts []struct {
						Name      string `yaml:"name"`
						MountPath string `yaml:"mountPath"`
						SubPath   string `yaml:"subPath"`
						ReadOnly  bool   `yaml:"readOnly"`
					} `yaml:"volumeMounts"`
				} `yaml:"containers"`
				Volumes []struct {
					Name      string `yaml:"name"`
					ConfigMap *struct {
						Name string `yaml:"name"`
					} `yaml:"configMap"`
					Secret *struct {
						SecretName string `yaml:"secretName"`
					} `yaml:"secret"`
				} `yaml:"volumes"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

// mountedSource returns what is mounted at path ("configMap NAME" or
// "secret NAME") and whether read-only, or "" if nothing is.
func (p registryPod) mountedSource(t *testing.T, path string) (string, bool) {
	t.Helper()
	spec := p.Spec.Template.Spec
	for _, m := range spec.Containers[0].VolumeMounts {
		if m.MountPath != path {
			continue
		}
		if m.SubPath != "" {
			t.Errorf("%s is mounted with subPath %q: kubelet never updates a subPath mount, so the config would not reload", path, m.SubPath)
		}
		for _, v := range spec.Volumes {
			switch {
			case v.Name != m.Name:
			case v.ConfigMap != nil:
				return "configMap " + v.ConfigMap.Name, m.ReadOnly
			case v.Secret != nil:
				return "secret " + v.Secret.SecretName, m.ReadOnly
			}
		}
		t.Fatalf("mount %s names volume %q, which is neither a ConfigMap nor a Secret", path, m.Name)
	}
	return "", false
}

// TestRegistryConfig: registries.config becomes the ConfigMap
// strata-registries, holding a file that the plugin's own parser accepts,
// mounted as a directory (so that updates reach the plugin) and passed as
// --registry-config; registries.certsSecret is mounted at /etc/strata/certs.
// Both are absent by default.
func TestRegistryConfig(t *testing.T) {
	t.Parallel()
	values := `registries:
  config:
    registries:
      docker.io:
        mirrors: [zot.cache.svc.cluster.local:5000, mirror.local:5000]
      zot.cache.svc.cluster.local:5000:
        insecure: true
      registry.corp:
        skipVerify: true
  certsSecret: corp-registry-certs
`
	objs := render(t, values)
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	var found bool
	for _, o := range objs {
		if o.Kind == "ConfigMap" && o.Name == "strata-registries" {
			found = true
			o.decode(t, &cm)
			if o.Namespace != releaseNS {
				t.Errorf("ConfigMap namespace %q, want %q", o.Namespace, releaseNS)
			}
		}
	}
	if !found {
		t.Fatalf("no ConfigMap strata-registries among %v", objs.kinds())
	}
	if len(cm.Data) != 1 || cm.Data["registries.yaml"] == "" {
		t.Fatalf("ConfigMap data %v, want one key registries.yaml", cm.Data)
	}
	conf, err := registryconf.Parse([]byte(cm.Data["registries.yaml"]), "/etc/strata/registries")
	if err != nil {
		t.Fatalf("the rendered registries.yaml does not load: %v\n%s", err, cm.Data["registries.yaml"])
	}
	if hub := conf.Lookup("index.docker.io"); hub == nil || !slices.Equal(hub.Mirrors, []string{"zot.cache.svc.cluster.local:5000", "mirror.local:5000"}) {
		t.Errorf("docker.io in the rendered file: %+v, want the two mirrors in order", hub)
	}
	if z := conf.Lookup("zot.cache.svc.cluster.local:5000"); z == nil || !z.Insecure {
		t.Errorf("the mirror's entry: %+v, want insecure", z)
	}

	_, c := nodePlugin(t, objs)
	if got := flag(t, flags(t, c.Args), "registry-config"); got != "/etc/strata/registries/registries.yaml" {
		t.Errorf("--registry-config=%s, want /etc/strata/registries/registries.yaml", got)
	}
	var pod registryPod
	objs.one(t, "DaemonSet", &pod)
	if src, ro := pod.mountedSource(t, "/etc/strata/registries"); src != "configMap strata-registries" || !ro {
		t.Errorf("/etc/strata/registries mounts %q (read-only %v), want configMap strata-registries, read-only", src, ro)
	}
	if src, ro := pod.mountedSource(t, "/etc/strata/certs"); src != "secret corp-registry-certs" || !ro {
		t.Errorf("/etc/strata/certs mounts %q (read-only %v), want secret corp-registry-certs, read-only", src, ro)
	}
	defined := strataCSIFlags(t)
	for name := range flags(t, c.Args) {
		if !defined[name] {
			t.Errorf("the chart passes --%s, which cmd/strata-csi does not define", name)
		}
	}

	t.Run("defaults", func(t *testing.T) {
		t.Parallel()
		objs := render(t, "")
		for _, o := range objs {
			if o.Kind == "ConfigMap" {
				t.Errorf("ConfigMap %s rendered without registries.config", o.Name)
			}
		}
		_, c := nodePlugin(t, objs)
		if v, ok := flags(t, c.Args)["registry-config"]; ok {
			t.Errorf("--registry-config=%q without registries.config", v)
		}
		var pod registryPod
		objs.one(t, "DaemonSet", &pod)
		for _, p := range []string{"/etc/strata/registries", "/etc/strata/certs"} {
			if src, _ := pod.mountedSource(t, p); src != "" {
				t.Errorf("%s mounts %s by default", p, src)
			}
		}
	})
}

// TestRegistryConfigSchema: the schema checks registries.config as strictly
// as the plugin's parser, so a mistake fails helm install instead of the
// plugin's start.
func TestRegistryConfigSchema(t *testing.T) {
	t.Parallel()
	expectRefused(t, []refusal{
		{"unknown host key", "registries: {config: {registries: {docker.io: {mirror: [m.local]}}}}", "mirror"},
		{"unknown top-level key", "registries: {config: {registry: {}}}", "registry"},
		{"host with a scheme", "registries: {config: {registries: {\"https://r.corp\": {}}}}", "https://r.corp"},
		{"mirror with a scheme", "registries: {config: {registries: {r.corp: {mirrors: [\"http://m.local\"]}}}}", "http://m.local"},
		{"insecure not a bool", "registries: {config: {registries: {r.corp: {insecure: \"yes\"}}}}", "insecure"},
		{"client cert without key", "registries: {config: {registries: {r.corp: {clientCert: {cert: /c.pem}}}}}", "key"},
		{"certs secret not a name", "registries: {certsSecret: \"Corp Certs\"}", "certsSecret"},
	})
}
