package chart

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestDefaultObjects: the chart installs exactly the CSIDriver, the node
// plugin's DaemonSet, its ServiceAccount and its RBAC, the pull-secrets
// ServiceAccount with the Role that reads its secrets, in their dedicated
// namespace (which the chart creates), the controller's Deployment,
// ServiceAccount and RBAC (the Role for its Lease), the other namespaced
// ones in the release's namespace. VolumeCommits are off: no RBAC for them.
func TestDefaultObjects(t *testing.T) {
	t.Parallel()
	objs := render(t, "")
	got := objs.kinds()
	slices.Sort(got)
	// The storage capacity's RBAC (storageCapacity.enabled) is a
	// ClusterRole and a Role of the node plugin and a Role of the
	// controller, each with its binding.
	want := []string{"CSIDriver", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ClusterRoleBinding",
		"DaemonSet", "Deployment", "Namespace", "Role", "Role", "Role", "Role", "RoleBinding", "RoleBinding", "RoleBinding", "RoleBinding",
		"ServiceAccount", "ServiceAccount", "ServiceAccount"}
	if !slices.Equal(got, want) {
		t.Fatalf("kinds: got %v, want %v", got, want)
	}
	for _, o := range objs {
		namespaced := o.Kind == "DaemonSet" || o.Kind == "Deployment" || o.Kind == "ServiceAccount" || o.Kind == "Role" || o.Kind == "RoleBinding"
		if namespaced && strings.HasSuffix(o.Name, "-pull-secrets") {
			if o.Namespace != pullSecretsNS {
				t.Errorf("%s %s: namespace %q, want %q", o.Kind, o.Name, o.Namespace, pullSecretsNS)
			}
			continue
		}
		if namespaced && o.Namespace != releaseNS {
			t.Errorf("%s %s: namespace %q, want %q", o.Kind, o.Name, o.Namespace, releaseNS)
		}
		if !namespaced && o.Namespace != "" {
			t.Errorf("%s %s is cluster-scoped but has namespace %q", o.Kind, o.Name, o.Namespace)
		}
	}
}

// TestCSIDriver: the CSIDriver object, field by field.
func TestCSIDriver(t *testing.T) {
	t.Parallel()
	var d csiDriver
	o := render(t, "").one(t, "CSIDriver", &d)
	if o.Name != driverName {
		t.Errorf("name %q, want %q", o.Name, driverName)
	}
	s := d.Spec
	boolField := func(name string, got *bool, want bool) {
		if got == nil || *got != want {
			t.Errorf("%s: got %v, want %v", name, ptrString(got), want)
		}
	}
	boolField("attachRequired", s.AttachRequired, false)
	boolField("podInfoOnMount", s.PodInfoOnMount, true)
	boolField("requiresRepublish", s.RequiresRepublish, false)
	if want := []string{"Persistent", "Ephemeral"}; !slices.Equal(s.VolumeLifecycleModes, want) {
		t.Errorf("volumeLifecycleModes: got %q, want %q", s.VolumeLifecycleModes, want)
	}
	// A recursive chown by kubelet would copy up every file of the image.
	if s.FSGroupPolicy != "None" {
		t.Errorf("fsGroupPolicy: got %q, want None", s.FSGroupPolicy)
	}
}

func ptrString[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}

// TestDaemonSet: the node plugin as kubelet needs it.
func TestDaemonSet(t *testing.T) {
	t.Parallel()
	objs := render(t, "")
	ds, c := nodePlugin(t, objs)
	spec := ds.Spec.Template.Spec

	if c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the container is not privileged: it mounts overlays and needs Bidirectional propagation")
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork is off")
	}
	if spec.DNSPolicy != "ClusterFirstWithHostNet" {
		t.Errorf("dnsPolicy %q, want ClusterFirstWithHostNet (hostNetwork)", spec.DNSPolicy)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	if want := []map[string]string{{"operator": "Exists"}}; !reflect.DeepEqual(spec.Tolerations, want) {
		t.Errorf("tolerations %v, want %v (every node)", spec.Tolerations, want)
	}
	if want := map[string]string{"kubernetes.io/os": "linux"}; !reflect.DeepEqual(spec.NodeSelector, want) {
		t.Errorf("nodeSelector %v, want %v", spec.NodeSelector, want)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g != 30 {
		t.Errorf("terminationGracePeriodSeconds %s, want 30", ptrString(g))
	}
	if u := ds.Spec.UpdateStrategy; u.Type != "RollingUpdate" || fmt.Sprint(u.RollingUpdate.MaxUnavailable) != "1" {
		t.Errorf("updateStrategy %+v, want RollingUpdate with maxUnavailable 1", u)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels %v", k, v, ds.Spec.Template.Metadata.Labels)
		}
	}
	if c.Image != "localhost/strata/strata-csi:0.1.0" || c.ImagePullPolicy != "IfNotPresent" {
		t.Errorf("image %q (%s), want localhost/strata/strata-csi:0.1.0 (IfNotPresent)", c.Image, c.ImagePullPolicy)
	}
	if want := map[string]string{"cpu": "50m", "memory": "64Mi"}; !reflect.DeepEqual(c.Resources.Requests, want) {
		t.Errorf("resource requests %v, want %v", c.Resources.Requests, want)
	}
	if len(c.Resources.Limits) != 0 {
		t.Errorf("resource limits %v, want none by default", c.Resources.Limits)
	}

	// The service account exists and is the one the binding names.
	var sa struct{}
	saObj := objs.byName(t, "ServiceAccount", "strata-node", &sa)
	if spec.ServiceAccountName != saObj.Name {
		t.Errorf("serviceAccountName %q, but the ServiceAccount is %q", spec.ServiceAccountName, saObj.Name)
	}

	f := flags(t, c.Args)
	for name, want := range map[string]string{
		"mode":                     "node",
		"endpoint":                 "unix:///csi/csi.sock",
		"node-id":                  "$(NODE_NAME)",
		"root":                     "/var/lib/strata",
		"kubelet-registration-dir": "/registration",
		"kubelet-csi-endpoint":     "/var/lib/kubelet/plugins/strata.csi.dev/csi.sock",
		"health-address":           ":9808",
		"v":                        "2",
		"concurrency":              "3",
	} {
		if got := flag(t, f, name); got != want {
			t.Errorf("--%s=%s, want %s", name, got, want)
		}
	}
	for _, name := range []string{"metrics-address", "insecure-registry", "driver-name"} {
		if v, ok := f[name]; ok {
			t.Errorf("--%s=%q set by default", name, v)
		}
	}
	var nodeName bool
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	if !nodeName {
		t.Errorf("env NODE_NAME does not come from spec.nodeName (env %+v)", c.Env)
	}

	checkPaths(t, spec, c, "/var/lib/kubelet", "/var/lib/strata")

	// The liveness probe asks the port that --health-address opens.
	p := c.LivenessProbe
	if p == nil || p.HTTPGet == nil {
		t.Fatal("no httpGet liveness probe")
	}
	if p.HTTPGet.Path != "/healthz" {
		t.Errorf("liveness probe path %q, want /healthz", p.HTTPGet.Path)
	}
	if got, want := probePort(t, c), strings.TrimPrefix(flag(t, f, "health-address"), ":"); got != want {
		t.Errorf("liveness probe port %s, but --health-address=%s", got, flag(t, f, "health-address"))
	}
	if p.PeriodSeconds != 10 || p.FailureThreshold != 5 {
		t.Errorf("liveness probe every %ds, %d failures; want 10s, 5", p.PeriodSeconds, p.FailureThreshold)
	}
}

// checkPaths checks the paths kubelet and the plugin must agree on, for a
// chart rendered with kubeletDir and stateDir.
func checkPaths(t *testing.T, spec podSpec, c container, kubeletDir, stateDir string) {
	t.Helper()
	f := flags(t, c.Args)
	pluginDir := kubeletDir + "/plugins/" + driverName

	// The socket the plugin listens on is the one kubelet is told about.
	endpoint := strings.TrimPrefix(flag(t, f, "endpoint"), "unix://")
	host, typ, _ := mountOf(t, spec, c, path.Dir(endpoint))
	if host != pluginDir || typ != "DirectoryOrCreate" {
		t.Errorf("the socket directory %s is hostPath %s (%s), want %s (DirectoryOrCreate)", path.Dir(endpoint), host, typ, pluginDir)
	}
	if got, want := flag(t, f, "kubelet-csi-endpoint"), path.Join(host, path.Base(endpoint)); got != want {
		t.Errorf("--kubelet-csi-endpoint=%s, but the socket is at %s on the node", got, want)
	}
	// The plugin registers in kubelet's plugins_registry.
	host, _, _ = mountOf(t, spec, c, flag(t, f, "kubelet-registration-dir"))
	if want := kubeletDir + "/plugins_registry"; host != want {
		t.Errorf("--kubelet-registration-dir is hostPath %s, want %s", host, want)
	}
	// Pods' volume paths: the same path inside and out, and the overlays
	// mounted there reach the node.
	host, _, prop := mountOf(t, spec, c, kubeletDir)
	if host != kubeletDir || prop != "Bidirectional" {
		t.Errorf("kubelet dir %s is hostPath %s with propagation %q, want the same path, Bidirectional", kubeletDir, host, prop)
	}
	// The state root: the same path inside and out (volume.json records
	// paths), Bidirectional for a subPath volume's overlay.
	if got := flag(t, f, "root"); got != stateDir {
		t.Errorf("--root=%s, want %s", got, stateDir)
	}
	host, typ, prop = mountOf(t, spec, c, stateDir)
	if host != stateDir || typ != "DirectoryOrCreate" || prop != "Bidirectional" {
		t.Errorf("state dir %s is hostPath %s (%s) with propagation %q, want the same path (DirectoryOrCreate), Bidirectional", stateDir, host, typ, prop)
	}
}

// probePort returns the liveness probe's port as a number, resolving a named
// port through the container's ports.
func probePort(t *testing.T, c container) string {
	t.Helper()
	port := fmt.Sprint(c.LivenessProbe.HTTPGet.Port)
	if _, err := strconv.Atoi(port); err == nil {
		return port
	}
	for _, p := range c.Ports {
		if p.Name == port {
			return strconv.Itoa(p.ContainerPort)
		}
	}
	t.Fatalf("liveness probe names port %q, which the container does not declare", port)
	return ""
}

// TestRBAC: least privilege, only events, no wildcard, bound to the node
// plugin's service account.
func TestRBAC(t *testing.T) {
	t.Parallel()
	objs := render(t, "").named("strata-node") // the controller's: TestControllerRBAC
	var role clusterRole
	roleObj := objs.one(t, "ClusterRole", &role)
	if role.AggregationRule != nil {
		t.Error("the ClusterRole aggregates other roles")
	}
	if len(role.Rules) == 0 {
		t.Error("the ClusterRole has no rules")
	}
	allowedVerbs := []string{"create", "patch"}
	for _, r := range role.Rules {
		for _, list := range [][]string{r.APIGroups, r.Resources, r.Verbs, r.ResourceNames, r.NonResourceURLs} {
			for _, v := range list {
				if strings.Contains(v, "*") {
					t.Errorf("rule %+v has a wildcard", r)
				}
			}
		}
		if len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v grants non-resource URLs", r)
		}
		if slices.Equal(r.Resources, []string{"persistentvolumes"}) {
			continue // the clone sweep's: TestNodeReadsPersistentVolumes
		}
		for _, g := range r.APIGroups {
			if g != "" && g != "events.k8s.io" {
				t.Errorf("rule %+v grants API group %q", r, g)
			}
		}
		if !slices.Equal(r.Resources, []string{"events"}) {
			t.Errorf("rule %+v grants resources %q, want only events", r, r.Resources)
		}
		for _, v := range r.Verbs {
			if !slices.Contains(allowedVerbs, v) {
				t.Errorf("rule %+v grants verb %q, want only %v", r, v, allowedVerbs)
			}
		}
	}

	var binding clusterRoleBinding
	objs.one(t, "ClusterRoleBinding", &binding)
	var sa struct{}
	saObj := objs.one(t, "ServiceAccount", &sa)
	if binding.RoleRef.Kind != "ClusterRole" || binding.RoleRef.Name != roleObj.Name {
		t.Errorf("binding refers to %s %s, want ClusterRole %s", binding.RoleRef.Kind, binding.RoleRef.Name, roleObj.Name)
	}
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" ||
		binding.Subjects[0].Name != saObj.Name || binding.Subjects[0].Namespace != releaseNS {
		t.Errorf("binding subjects %+v, want only ServiceAccount %s/%s", binding.Subjects, releaseNS, saObj.Name)
	}
}

// TestValues: each value changes what it should, and only that.
func TestValues(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		values string
		check  func(t *testing.T, spec podSpec, c container, f map[string][]string)
	}{
		{"kubeletDir", "kubeletDir: /var/lib/k0s/kubelet", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			checkPaths(t, spec, c, "/var/lib/k0s/kubelet", "/var/lib/strata")
			if got := flag(t, f, "kubelet-csi-endpoint"); got != "/var/lib/k0s/kubelet/plugins/strata.csi.dev/csi.sock" {
				t.Errorf("--kubelet-csi-endpoint=%s", got)
			}
			for _, v := range spec.Volumes {
				if v.HostPath != nil && strings.HasPrefix(v.HostPath.Path, "/var/lib/kubelet") {
					t.Errorf("volume %s still uses the default kubelet dir: %s", v.Name, v.HostPath.Path)
				}
			}
		}},
		{"stateDir", "stateDir: /mnt/fast/strata", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			checkPaths(t, spec, c, "/var/lib/kubelet", "/mnt/fast/strata")
		}},
		{"insecure registries", "registries: {insecure: [registry.local:5000, 10.0.0.7]}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if got, want := f["insecure-registry"], []string{"registry.local:5000", "10.0.0.7"}; !slices.Equal(got, want) {
				t.Errorf("--insecure-registry %q, want %q", got, want)
			}
		}},
		{"metrics", "metrics: {enabled: true}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			checkMetrics(t, c, f, 9809)
		}},
		{"metrics port", "metrics: {enabled: true, port: 9100}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			checkMetrics(t, c, f, 9100)
		}},
		{"metrics port without metrics", "metrics: {port: 9100}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if v, ok := f["metrics-address"]; ok {
				t.Errorf("--metrics-address=%q while metrics are disabled", v)
			}
			for _, p := range c.Ports {
				if p.Name == "metrics" {
					t.Errorf("metrics port %d declared while metrics are disabled", p.ContainerPort)
				}
			}
		}},
		{"health port", "healthPort: 19808", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if got := flag(t, f, "health-address"); got != ":19808" {
				t.Errorf("--health-address=%s", got)
			}
			if got := probePort(t, c); got != "19808" {
				t.Errorf("liveness probe port %s, want 19808", got)
			}
		}},
		{"log level and concurrency", "logLevel: 5\ncache: {concurrency: 8}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "v") != "5" || flag(t, f, "concurrency") != "8" {
				t.Errorf("--v=%s --concurrency=%s, want 5 and 8", flag(t, f, "v"), flag(t, f, "concurrency"))
			}
		}},
		{"cache budget in bytes", "cache: {maxBytes: 50Gi, lowWatermark: 0.7, minAge: 30m}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "cache-max-bytes") != "50Gi" || flag(t, f, "cache-low-watermark") != "0.7" || flag(t, f, "cache-high-watermark") != "0.9" || flag(t, f, "cache-min-age") != "30m" {
				t.Errorf("cache flags %v, want 50Gi, low 0.7, high 0.9, min age 30m", f)
			}
			if _, ok := f["cache-max-percent"]; ok {
				t.Error("--cache-max-percent given with a byte budget")
			}
		}},
		{"cache budget in percent", "cache: {maxPercent: 40}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "cache-max-percent") != "40" {
				t.Errorf("--cache-max-percent=%s, want 40", flag(t, f, "cache-max-percent"))
			}
		}},
		{"default cache budget and layer limits", "logLevel: 2", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "cache-max-percent") != "50" || flag(t, f, "layer-max-expansion") != "100" || flag(t, f, "layer-max-bytes") != "100Gi" {
				t.Errorf("cache flags %v, want --cache-max-percent=50 --layer-max-expansion=100 --layer-max-bytes=100Gi", f)
			}
			for _, name := range []string{"cache-max-bytes", "prepull"} {
				if _, ok := f[name]; ok {
					t.Errorf("--%s given by default", name)
				}
			}
		}},
		{"unbounded cache", "cache: {maxPercent: 0, layerMaxExpansion: 0, layerMaxBytes: \"0\"}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "cache-max-percent") != "0" || flag(t, f, "layer-max-expansion") != "0" || flag(t, f, "layer-max-bytes") != "0" {
				t.Errorf("cache flags %v, want 0 for each limit", f)
			}
			for _, name := range []string{"cache-max-bytes", "cache-min-age"} {
				if _, ok := f[name]; ok {
					t.Errorf("--%s given for an unbounded cache", name)
				}
			}
		}},
		{"credentials verification", "registries: {credentialsVerification: NeverVerify}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if flag(t, f, "pull-credentials-verification") != "NeverVerify" {
				t.Errorf("--pull-credentials-verification=%s, want NeverVerify", flag(t, f, "pull-credentials-verification"))
			}
		}},
		{"prepull", "cache: {prepull: [registry.local:5000/datasets/a:v1, registry.local:5000/datasets/b:v2]}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if got, want := f["prepull"], []string{"registry.local:5000/datasets/a:v1", "registry.local:5000/datasets/b:v2"}; !slices.Equal(got, want) {
				t.Errorf("--prepull %v, want %v", got, want)
			}
		}},
		{"image", "image: {repository: 127.0.0.1:5000/strata/strata-csi, tag: v0.2.0-3-gabc, pullPolicy: Never}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if c.Image != "127.0.0.1:5000/strata/strata-csi:v0.2.0-3-gabc" || c.ImagePullPolicy != "Never" {
				t.Errorf("image %q (%s)", c.Image, c.ImagePullPolicy)
			}
		}},
		{"scheduling", "nodeSelector: {strata.csi.dev/enabled: \"true\"}\ntolerations: [{key: gpu, operator: Equal, value: a100, effect: NoSchedule}]\npriorityClassName: \"\"",
			func(t *testing.T, spec podSpec, c container, f map[string][]string) {
				if want := map[string]string{"kubernetes.io/os": "linux", "strata.csi.dev/enabled": "true"}; !reflect.DeepEqual(spec.NodeSelector, want) {
					t.Errorf("nodeSelector %v, want %v", spec.NodeSelector, want)
				}
				if want := []map[string]string{{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}}; !reflect.DeepEqual(spec.Tolerations, want) {
					t.Errorf("tolerations %v, want %v", spec.Tolerations, want)
				}
				if spec.PriorityClassName != "" {
					t.Errorf("priorityClassName %q, want none", spec.PriorityClassName)
				}
			}},
		{"resources", "resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 1Gi}}", func(t *testing.T, spec podSpec, c container, f map[string][]string) {
			if want := map[string]string{"cpu": "100m", "memory": "128Mi"}; !reflect.DeepEqual(c.Resources.Requests, want) {
				t.Errorf("requests %v, want %v", c.Resources.Requests, want)
			}
			if want := map[string]string{"memory": "1Gi"}; !reflect.DeepEqual(c.Resources.Limits, want) {
				t.Errorf("limits %v, want %v", c.Resources.Limits, want)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ds, c := nodePlugin(t, render(t, tc.values))
			tc.check(t, ds.Spec.Template.Spec, c, flags(t, c.Args))
		})
	}

	t.Run("podAnnotations", func(t *testing.T) {
		t.Parallel()
		ds, _ := nodePlugin(t, render(t, "podAnnotations: {example.com/team: data}"))
		if got := ds.Spec.Template.Metadata.Annotations["example.com/team"]; got != "data" {
			t.Errorf("pod annotation example.com/team=%q, want data (annotations %v)", got, ds.Spec.Template.Metadata.Annotations)
		}
	})
}

// checkMetrics: --metrics-address and a container port named metrics.
func checkMetrics(t *testing.T, c container, f map[string][]string, port int) {
	t.Helper()
	if got, want := flag(t, f, "metrics-address"), fmt.Sprintf(":%d", port); got != want {
		t.Errorf("--metrics-address=%s, want %s", got, want)
	}
	var found bool
	for _, p := range c.Ports {
		if p.Name == "metrics" {
			found = p.ContainerPort == port
		}
	}
	if !found {
		t.Errorf("no container port metrics=%d (ports %+v)", port, c.Ports)
	}
}

// TestFlagsExist: every flag the chart passes, with all options on, is one
// that strata-csi defines (read from cmd/strata-csi's source), so that a
// renamed flag cannot leave the DaemonSet crash-looping.
func TestFlagsExist(t *testing.T) {
	t.Parallel()
	defined := strataCSIFlags(t)
	_, c := nodePlugin(t, render(t, "metrics: {enabled: true}\nvolumeCommits: {enabled: true, allowedRegistries: [r.io], namespaces: [team-a]}\n"+withProviders))
	for name := range flags(t, c.Args) {
		if !defined[name] {
			t.Errorf("the chart passes --%s, which cmd/strata-csi does not define", name)
		}
	}
}

// strataCSIFlags returns the flag names registered in cmd/strata-csi
// (flag.String("name", ...), flag.Var(&v, "name", ...), ...) and klog's --v.
func strataCSIFlags(t *testing.T) map[string]bool {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "cmd", "strata-csi")
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	defined := map[string]bool{"v": true} // klog.InitFlags
	for _, file := range files {
		if strings.HasSuffix(file, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, file, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); !ok || x.Name != "flag" {
				return true
			}
			arg := 0 // flag.String("name", ...)
			if strings.HasSuffix(sel.Sel.Name, "Var") {
				arg = 1 // flag.Var(&v, "name", ...), flag.StringVar(&v, "name", ...)
			}
			if len(call.Args) > arg {
				if lit, ok := call.Args[arg].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if name, err := strconv.Unquote(lit.Value); err == nil {
						defined[name] = true
					}
				}
			}
			return true
		})
	}
	if !defined["endpoint"] || !defined["node-id"] {
		t.Fatalf("found no --endpoint or --node-id in %s: the flag parser of this test is out of date (found %v)", dir, defined)
	}
	return defined
}

// TestLint: helm lint --strict passes, with the defaults and with every
// option on.
func TestLint(t *testing.T) {
	t.Parallel()
	for _, values := range []string{"", "metrics: {enabled: true}\nregistries: {insecure: [registry.local:5000]}\nkubeletDir: /var/lib/k0s/kubelet", withProviders} {
		args := []string{"lint", "--strict", chartDir}
		if values != "" {
			args = append(args, "-f", valuesFile(t, values))
		}
		if out, err := runHelm(t, args...); err != nil {
			t.Errorf("helm lint --strict (values %q): %v\n%s", values, err, out)
		}
	}
}

// TestSchemaRejects: a bad value fails helm template with a message naming
// it, instead of rendering a broken DaemonSet.
func TestSchemaRejects(t *testing.T) {
	t.Parallel()
	expectRefused(t, []refusal{
		{"logLevel a word", "logLevel: loud", "logLevel"},
		{"logLevel negative", "logLevel: -1", "logLevel"},
		{"unknown key", "kubeletdir: /var/lib/kubelet", "kubeletdir"},
		{"relative kubeletDir", "kubeletDir: var/lib/kubelet", "kubeletDir"},
		{"kubeletDir with a trailing slash", "kubeletDir: /var/lib/kubelet/", "kubeletDir"},
		{"stateDir root", "stateDir: /", "stateDir"},
		{"pull policy", "image: {pullPolicy: Sometimes}", "pullPolicy"},
		{"unknown image key", "image: {name: x}", "name"},
		{"insecure registries not a list", "registries: {insecure: registry.local:5000}", "insecure"},
		{"insecure registry with a scheme", "registries: {insecure: [\"http://registry.local:5000\"]}", "insecure"},
		{"metrics port out of range", "metrics: {enabled: true, port: 70000}", "port"},
		{"metrics enabled a string", "metrics: {enabled: \"yes\"}", "enabled"},
		{"concurrency zero", "cache: {concurrency: 0}", "concurrency"},
		{"credentials verification unknown", "registries: {credentialsVerification: Sometimes}", "credentialsVerification"},
		{"cache size not a quantity", "cache: {maxBytes: 5GB}", "maxBytes"},
		{"layer max bytes not a quantity", "cache: {layerMaxBytes: 5GB}", "layerMaxBytes"},
		{"layer max expansion negative", "cache: {layerMaxExpansion: -1}", "layerMaxExpansion"},
		{"cache percent over 100", "cache: {maxPercent: 140}", "maxPercent"},
		{"cache min age not a duration", "cache: {minAge: soon}", "minAge"},
		{"toleration operator", "tolerations: [{operator: Maybe}]", "operator"},
		{"resource quantity", "resources: {requests: {cpu: lots}}", "cpu"},
		{"metrics port is the health port", "metrics: {enabled: true, port: 9808}", "healthPort"},
	})
}

// refusal is a values document that helm must refuse, and a word that its
// message must mention.
type refusal struct{ name, values, mention string }

// expectRefused renders the chart with each document and checks that helm
// refuses it with a message that names the offending value.
func expectRefused(t *testing.T, cases []refusal) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out, err := runHelm(t, templateArgs(t, tc.values)...)
			if err == nil {
				t.Fatalf("helm template accepted %q:\n%.300s", tc.values, out)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("helm template refused %q, but its message does not mention %q: %v", tc.values, tc.mention, err)
			}
		})
	}
}
