package chart

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.yaml.in/yaml/v3"
)

// helmVersion is the helm that hack/install-deps installs; hack/render-deploy
// insists on it too, so that deploy/strata.yaml renders the same everywhere.
const helmVersion = "v3.22.0"

// The chart under test and where it installs in deploy/strata.yaml.
const (
	chartDir  = "charts/strata"
	releaseNS = "kube-system"
	// The default namespace of the driver's pull secrets.
	pullSecretsNS = "strata-pull-secrets"
	driverName    = "strata.csi.dev"
)

// repoRoot is the repository's top directory (the test runs in test/chart).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, chartDir, "Chart.yaml")); err != nil {
		t.Fatalf("chart not found from %s: %v", root, err)
	}
	return root
}

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
)

// helm returns the path of helm v3.22.0: $HELM, else $(go env GOPATH)/bin/helm
// (where hack/install-deps puts it), else helm on PATH. The same search as
// hack/render-deploy.
func helm(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		var cands []string
		if h := os.Getenv("HELM"); h != "" {
			cands = append(cands, h)
		}
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			for _, p := range filepath.SplitList(strings.TrimSpace(string(out))) {
				cands = append(cands, filepath.Join(p, "bin", "helm"))
			}
		}
		if p, err := exec.LookPath("helm"); err == nil {
			cands = append(cands, p)
		}
		var seen []string
		for _, c := range cands {
			out, err := exec.Command(c, "version", "--template", "{{.Version}}").Output()
			if err != nil {
				continue
			}
			v := strings.TrimSpace(string(out))
			if v == helmVersion {
				helmPath = c
				return
			}
			seen = append(seen, c+" is "+v)
		}
		helmErr = errors.New("helm " + helmVersion + " not found (" + strings.Join(seen, "; ") + "): run hack/install-deps")
	})
	if helmErr != nil {
		t.Fatal(helmErr)
	}
	return helmPath
}

// runHelm runs helm in the repository root and returns its stdout, or its
// stderr as the error.
func runHelm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(helm(t), args...)
	cmd.Dir = repoRoot(t)
	// A clean helm home: no repositories or plugins of the machine's user.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), errors.New(strings.TrimSpace(stderr.String()) + " (" + err.Error() + ")")
	}
	return stdout.Bytes(), nil
}

// valuesFile writes values (YAML) to a file for helm's -f.
func valuesFile(t *testing.T, values string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(p, []byte(values), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// templateArgs are the arguments of `helm template` for the release
// "strata" in kube-system, with values (YAML) if not empty.
func templateArgs(t *testing.T, values string) []string {
	args := []string{"template", "strata", chartDir, "--namespace", releaseNS}
	if values != "" {
		args = append(args, "-f", valuesFile(t, values))
	}
	return args
}

// render renders the chart with values (YAML, "" for the defaults) and
// returns its objects.
func render(t *testing.T, values string) objects {
	t.Helper()
	out, err := runHelm(t, templateArgs(t, values)...)
	if err != nil {
		t.Fatalf("helm template with values %q: %v", values, err)
	}
	return parseObjects(t, "helm template", out)
}

// object is one Kubernetes object of a YAML stream: its kind and name, and
// its YAML for decoding into a typed view.
type object struct {
	Kind      string
	Name      string
	Namespace string
	node      *yaml.Node
}

type objects []object

// parseObjects splits a multi-document YAML stream into objects, skipping
// empty documents.
func parseObjects(t *testing.T, what string, data []byte) objects {
	t.Helper()
	var objs objects
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: parse YAML: %v", what, err)
		}
		if len(n.Content) == 0 || n.Content[0].Kind == yaml.ScalarNode && n.Content[0].Tag == "!!null" {
			continue // an empty document
		}
		var head struct {
			APIVersion string `yaml:"apiVersion"`
			Kind       string `yaml:"kind"`
			Metadata   struct {
				Name      string `yaml:"name"`
				Namespace string `yaml:"namespace"`
			} `yaml:"metadata"`
		}
		if err := n.Decode(&head); err != nil {
			t.Fatalf("%s: document at line %d: %v", what, n.Line, err)
		}
		if head.APIVersion == "" || head.Kind == "" || head.Metadata.Name == "" {
			t.Fatalf("%s: document at line %d lacks apiVersion, kind or metadata.name", what, n.Line)
		}
		objs = append(objs, object{Kind: head.Kind, Name: head.Metadata.Name, Namespace: head.Metadata.Namespace, node: &n})
	}
	return objs
}

// kinds lists the objects' kinds in order.
func (objs objects) kinds() []string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.Kind)
	}
	return ks
}

// one decodes the only object of kind into v.
func (objs objects) one(t *testing.T, kind string, v any) object {
	t.Helper()
	var found []object
	for _, o := range objs {
		if o.Kind == kind {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one %s, found %d among %v", kind, len(found), objs.kinds())
	}
	found[0].decode(t, v)
	return found[0]
}

func (o object) decode(t *testing.T, v any) {
	t.Helper()
	if err := o.node.Decode(v); err != nil {
		t.Fatalf("decode %s %s: %v", o.Kind, o.Name, err)
	}
}

// Typed views of the fields the tests look at.

type csiDriver struct {
	Spec struct {
		AttachRequired       *bool    `yaml:"attachRequired"`
		PodInfoOnMount       *bool    `yaml:"podInfoOnMount"`
		VolumeLifecycleModes []string `yaml:"volumeLifecycleModes"`
		FSGroupPolicy        string   `yaml:"fsGroupPolicy"`
		RequiresRepublish    *bool    `yaml:"requiresRepublish"`
	} `yaml:"spec"`
}

type daemonSet struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		UpdateStrategy struct {
			Type          string `yaml:"type"`
			RollingUpdate struct {
				MaxUnavailable any `yaml:"maxUnavailable"`
			} `yaml:"rollingUpdate"`
		} `yaml:"updateStrategy"`
		Template struct {
			Metadata struct {
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec podSpec `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type podSpec struct {
	ServiceAccountName            string              `yaml:"serviceAccountName"`
	PriorityClassName             string              `yaml:"priorityClassName"`
	HostNetwork                   bool                `yaml:"hostNetwork"`
	DNSPolicy                     string              `yaml:"dnsPolicy"`
	TerminationGracePeriodSeconds *int                `yaml:"terminationGracePeriodSeconds"`
	NodeSelector                  map[string]string   `yaml:"nodeSelector"`
	Tolerations                   []map[string]string `yaml:"tolerations"`
	Containers                    []container         `yaml:"containers"`
	InitContainers                []container         `yaml:"initContainers"`
	Volumes                       []volume            `yaml:"volumes"`
}

type container struct {
	Name            string   `yaml:"name"`
	Image           string   `yaml:"image"`
	ImagePullPolicy string   `yaml:"imagePullPolicy"`
	Command         []string `yaml:"command"`
	Args            []string `yaml:"args"`
	Env             []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom struct {
			FieldRef struct {
				FieldPath string `yaml:"fieldPath"`
			} `yaml:"fieldRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	SecurityContext struct {
		Privileged *bool `yaml:"privileged"`
	} `yaml:"securityContext"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
		HostPort      int    `yaml:"hostPort"`
	} `yaml:"ports"`
	LivenessProbe *struct {
		HTTPGet *struct {
			Path string `yaml:"path"`
			Port any    `yaml:"port"`
		} `yaml:"httpGet"`
		PeriodSeconds    int `yaml:"periodSeconds"`
		FailureThreshold int `yaml:"failureThreshold"`
	} `yaml:"livenessProbe"`
	Resources struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	VolumeMounts []struct {
		Name             string `yaml:"name"`
		MountPath        string `yaml:"mountPath"`
		MountPropagation string `yaml:"mountPropagation"`
		ReadOnly         bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
}

type volume struct {
	Name     string `yaml:"name"`
	HostPath *struct {
		Path string `yaml:"path"`
		Type string `yaml:"type"`
	} `yaml:"hostPath"`
	CSI                   *csiVolumeSource `yaml:"csi"`
	PersistentVolumeClaim *struct {
		ClaimName string `yaml:"claimName"`
	} `yaml:"persistentVolumeClaim"`
}

type csiVolumeSource struct {
	Driver           string            `yaml:"driver"`
	ReadOnly         bool              `yaml:"readOnly"`
	VolumeAttributes map[string]string `yaml:"volumeAttributes"`
}

type policyRule struct {
	APIGroups       []string `yaml:"apiGroups"`
	Resources       []string `yaml:"resources"`
	Verbs           []string `yaml:"verbs"`
	ResourceNames   []string `yaml:"resourceNames"`
	NonResourceURLs []string `yaml:"nonResourceURLs"`
}

type clusterRole struct {
	Rules           []policyRule `yaml:"rules"`
	AggregationRule any          `yaml:"aggregationRule"`
}

type clusterRoleBinding struct {
	RoleRef struct {
		Kind string `yaml:"kind"`
		Name string `yaml:"name"`
	} `yaml:"roleRef"`
	Subjects []struct {
		Kind      string `yaml:"kind"`
		Name      string `yaml:"name"`
		Namespace string `yaml:"namespace"`
	} `yaml:"subjects"`
}

// nodePlugin decodes the DaemonSet of objs and returns it with its only
// container.
func nodePlugin(t *testing.T, objs objects) (daemonSet, container) {
	t.Helper()
	var ds daemonSet
	objs.one(t, "DaemonSet", &ds)
	cs := ds.Spec.Template.Spec.Containers
	if len(cs) != 1 || len(ds.Spec.Template.Spec.InitContainers) != 0 {
		t.Fatalf("the node plugin runs %d containers and %d init containers; want exactly one container (strata-csi carries the sidecars' duties)",
			len(cs), len(ds.Spec.Template.Spec.InitContainers))
	}
	return ds, cs[0]
}

// flags parses "--name=value" arguments into name -> values, failing on any
// other form (the chart always uses the = form, so that a value can never be
// taken for a flag).
func flags(t *testing.T, args []string) map[string][]string {
	t.Helper()
	m := map[string][]string{}
	for _, a := range args {
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || !ok {
			t.Fatalf("argument %q is not of the form --name=value (args %q)", a, args)
		}
		m[name] = append(m[name], value)
	}
	return m
}

// flag returns the only value of flag name, failing if it is absent or
// repeated.
func flag(t *testing.T, f map[string][]string, name string) string {
	t.Helper()
	if len(f[name]) != 1 {
		t.Fatalf("flag --%s: want exactly one, got %q", name, f[name])
	}
	return f[name][0]
}

// mountOf returns the hostPath volume mounted at mountPath in c (and the
// mount's propagation), failing if there is none.
func mountOf(t *testing.T, spec podSpec, c container, mountPath string) (hostPath, hostPathType, propagation string) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.MountPath != mountPath {
			continue
		}
		for _, v := range spec.Volumes {
			if v.Name == m.Name {
				if v.HostPath == nil {
					t.Fatalf("volume %s mounted at %s is not a hostPath", v.Name, mountPath)
				}
				return v.HostPath.Path, v.HostPath.Type, m.MountPropagation
			}
		}
		t.Fatalf("mount at %s names volume %q, which the pod does not have", mountPath, m.Name)
	}
	t.Fatalf("nothing is mounted at %s (mounts %+v)", mountPath, c.VolumeMounts)
	return "", "", ""
}

// readFile reads a file of the repository.
func readFile(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
