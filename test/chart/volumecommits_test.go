package chart

import (
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// crd is the part of a CustomResourceDefinition the tests look at.
type crd struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name   string            `yaml:"name"`
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Spec struct {
		Group string `yaml:"group"`
		Scope string `yaml:"scope"`
		Names struct {
			Kind       string   `yaml:"kind"`
			ListKind   string   `yaml:"listKind"`
			Categories []string `yaml:"categories"`
			Plural     string   `yaml:"plural"`
			Singular   string   `yaml:"singular"`
			ShortNames []string `yaml:"shortNames"`
		} `yaml:"names"`
		Versions []struct {
			Name         string `yaml:"name"`
			Served       bool   `yaml:"served"`
			Storage      bool   `yaml:"storage"`
			Subresources struct {
				Status *struct{} `yaml:"status"`
			} `yaml:"subresources"`
			PrinterColumns []struct {
				Name     string `yaml:"name"`
				Type     string `yaml:"type"`
				JSONPath string `yaml:"jsonPath"`
				Priority int    `yaml:"priority"`
			} `yaml:"additionalPrinterColumns"`
			Schema struct {
				OpenAPIV3Schema schema `yaml:"openAPIV3Schema"`
			} `yaml:"schema"`
		} `yaml:"versions"`
	} `yaml:"spec"`
}

// schema is an OpenAPI v3 schema node, as structural CRD schemas use it.
type schema struct {
	Type        string            `yaml:"type"`
	Format      string            `yaml:"format"`
	Required    []string          `yaml:"required"`
	Enum        []string          `yaml:"enum"`
	MinLength   *int              `yaml:"minLength"`
	MaxLength   *int              `yaml:"maxLength"`
	Description string            `yaml:"description"`
	Properties  map[string]schema `yaml:"properties"`
	Validations []struct {
		Rule    string `yaml:"rule"`
		Message string `yaml:"message"`
	} `yaml:"x-kubernetes-validations"`
}

// at returns the schema at a dotted path of properties.
func (s schema) at(t *testing.T, path string) schema {
	t.Helper()
	cur := s
	for _, p := range strings.Split(path, ".") {
		next, ok := cur.Properties[p]
		if !ok {
			t.Fatalf("schema has no %s (at %s)", path, p)
		}
		cur = next
	}
	return cur
}

// rules lists the CEL rules of s.
func (s schema) rules() []string {
	var out []string
	for _, v := range s.Validations {
		out = append(out, v.Rule)
	}
	return out
}

// TestVolumeCommitCRD: the CRD in charts/strata/crds (which helm installs
// before the templates) parses strictly, and declares the API that
// driver/commits reads and writes: group, version, names, a status
// subresource, printer columns, and a schema whose rules require the image,
// allow exactly one source and keep the spec immutable.
func TestVolumeCommitCRD(t *testing.T) {
	t.Parallel()
	data := readFile(t, chartDir+"/crds/volumecommits.yaml")
	var c crd
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("crds/volumecommits.yaml: %v", err)
	}
	if c.APIVersion != "apiextensions.k8s.io/v1" || c.Kind != "CustomResourceDefinition" || c.Metadata.Name != "volumecommits.strata.csi.dev" {
		t.Errorf("%s %s %s, want apiextensions.k8s.io/v1 CustomResourceDefinition volumecommits.strata.csi.dev", c.APIVersion, c.Kind, c.Metadata.Name)
	}
	n := c.Spec.Names
	if c.Spec.Group != "strata.csi.dev" || c.Spec.Scope != "Namespaced" || n.Kind != "VolumeCommit" || n.Plural != "volumecommits" ||
		n.Singular != "volumecommit" || !slices.Equal(n.ShortNames, []string{"vc"}) {
		t.Errorf("group %s, scope %s, names %+v", c.Spec.Group, c.Spec.Scope, n)
	}
	if len(c.Spec.Versions) != 1 {
		t.Fatalf("%d versions, want v1alpha1 alone", len(c.Spec.Versions))
	}
	v := c.Spec.Versions[0]
	if v.Name != "v1alpha1" || !v.Served || !v.Storage || v.Subresources.Status == nil {
		t.Errorf("version %s served %t storage %t status subresource %t", v.Name, v.Served, v.Storage, v.Subresources.Status != nil)
	}
	cols := map[string]string{}
	for _, pc := range v.PrinterColumns {
		cols[pc.Name] = pc.JSONPath
	}
	for name, path := range map[string]string{"Phase": ".status.phase", "Image": ".spec.image", "Digest": ".status.digest", "Age": ".metadata.creationTimestamp"} {
		if cols[name] != path {
			t.Errorf("printer column %s: %q, want %s", name, cols[name], path)
		}
	}

	root := v.Schema.OpenAPIV3Schema
	spec := root.at(t, "spec")
	if !slices.Contains(spec.Required, "image") || !slices.Contains(spec.Required, "source") {
		t.Errorf("spec requires %v, want image and source", spec.Required)
	}
	if !slices.Contains(spec.rules(), "self == oldSelf") {
		t.Errorf("spec rules %q: no immutability rule", spec.rules())
	}
	src := root.at(t, "spec.source")
	if !slices.Contains(src.rules(), "has(self.persistentVolumeClaim) != has(self.pod)") {
		t.Errorf("spec.source rules %q: no exactly-one rule", src.rules())
	}
	if pod := root.at(t, "spec.source.pod"); !slices.Equal(pod.Required, []string{"name", "volume"}) {
		t.Errorf("spec.source.pod requires %v", pod.Required)
	}
	for _, p := range []string{"spec.image", "spec.pushSecretName", "spec.source.persistentVolumeClaim", "spec.source.pod.name",
		"spec.source.pod.volume", "status.node", "status.digest", "status.imageRef", "status.message"} {
		if s := root.at(t, p); s.Type != "string" {
			t.Errorf("%s: type %q, want string", p, s.Type)
		}
	}
	for _, p := range []string{"status.uploadedBytes", "status.layerBytes", "status.files", "status.deletions"} {
		if s := root.at(t, p); s.Type != "integer" || s.Format != "int64" {
			t.Errorf("%s: %s/%s, want integer/int64", p, s.Type, s.Format)
		}
	}
	for _, p := range []string{"status.startTime", "status.completionTime"} {
		if s := root.at(t, p); s.Type != "string" || s.Format != "date-time" {
			t.Errorf("%s: %s/%s, want string/date-time", p, s.Type, s.Format)
		}
	}
	if ph := root.at(t, "status.phase"); !slices.Equal(ph.Enum, []string{"Pending", "Running", "Succeeded", "Failed"}) {
		t.Errorf("status.phase enum %v", ph.Enum)
	}
	// Every rule has a message a user can act on, and every object schema
	// a type (a structural schema).
	var walk func(path string, s schema)
	walk = func(path string, s schema) {
		if s.Type == "" {
			t.Errorf("%s has no type: the schema is not structural", path)
		}
		for _, r := range s.Validations {
			if r.Message == "" {
				t.Errorf("%s: rule %q has no message", path, r.Rule)
			}
		}
		for k, p := range s.Properties {
			walk(path+"."+k, p)
		}
	}
	walk("", root)

	// helm installs it: it is in the chart's rendering with --include-crds.
	out, err := runHelm(t, append(templateArgs(t, ""), "--include-crds")...)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, o := range parseObjects(t, "helm template --include-crds", out) {
		found = found || o.Kind == "CustomResourceDefinition" && o.Name == "volumecommits.strata.csi.dev"
	}
	if !found {
		t.Error("helm template --include-crds renders no volumecommits.strata.csi.dev")
	}
}

// byName decodes the object of kind and name into v.
func (objs objects) byName(t *testing.T, kind, name string, v any) object {
	t.Helper()
	for _, o := range objs {
		if o.Kind == kind && o.Name == name {
			o.decode(t, v)
			return o
		}
	}
	t.Fatalf("no %s %s among %v", kind, name, objs.kinds())
	return object{}
}

// ruleSet flattens rules to "group/resource:verb" strings, sorted.
func ruleSet(rules []policyRule) []string {
	var out []string
	for _, r := range rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					out = append(out, g+"/"+res+":"+v)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

type labeledRole struct {
	Metadata struct {
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	clusterRole `yaml:",inline"`
}

// TestVolumeCommitRBAC: with volumeCommits.enabled, the node plugin gets
// exactly what driver/commits calls beyond the node role's grants (events,
// PersistentVolumes), bound to its ServiceAccount; namespace admins and
// editors may create VolumeCommits and viewers see them, through
// aggregation. Off (the default), none of it is rendered.
func TestVolumeCommitRBAC(t *testing.T) {
	t.Parallel()
	for _, o := range render(t, "") {
		if strings.Contains(o.Name, "volumecommits") {
			t.Errorf("%s %s rendered with VolumeCommits off", o.Kind, o.Name)
		}
	}
	objs := render(t, "volumeCommits: {enabled: true}")
	var node clusterRole
	objs.byName(t, "ClusterRole", "strata-node-volumecommits", &node)
	want := []string{
		"/persistentvolumeclaims:get", "/pods:get", "/secrets:get",
		"strata.csi.dev/volumecommits/status:update",
		"strata.csi.dev/volumecommits:get", "strata.csi.dev/volumecommits:list", "strata.csi.dev/volumecommits:watch",
	}
	if got := ruleSet(node.Rules); !slices.Equal(got, want) {
		t.Errorf("node rules:\n got %q\nwant %q", got, want)
	}
	for _, r := range node.Rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("unexpected rule %+v", r)
		}
	}
	var binding clusterRoleBinding
	objs.byName(t, "ClusterRoleBinding", "strata-node-volumecommits", &binding)
	if binding.RoleRef.Kind != "ClusterRole" || binding.RoleRef.Name != "strata-node-volumecommits" ||
		len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" || binding.Subjects[0].Name != "strata-node" ||
		binding.Subjects[0].Namespace != releaseNS {
		t.Errorf("binding %+v", binding)
	}

	// With namespaces: the same rules, as a Role and RoleBinding in each,
	// and the flag that limits the watch to them.
	nsObjs := render(t, "volumeCommits: {enabled: true, namespaces: [team-a, team-b]}")
	for _, o := range nsObjs {
		if o.Name == "strata-node-volumecommits" && (o.Kind == "ClusterRole" || o.Kind == "ClusterRoleBinding") {
			t.Errorf("%s %s rendered with volumeCommits.namespaces", o.Kind, o.Name)
		}
	}
	for _, ns := range []string{"team-a", "team-b"} {
		var role clusterRole
		var rb clusterRoleBinding
		found := 0
		for _, o := range nsObjs {
			if o.Name == "strata-node-volumecommits" && o.Namespace == ns {
				switch o.Kind {
				case "Role":
					o.decode(t, &role)
					found++
				case "RoleBinding":
					o.decode(t, &rb)
					found++
				}
			}
		}
		if found != 2 {
			t.Fatalf("namespace %s: %d of the Role and RoleBinding strata-node-volumecommits", ns, found)
		}
		if got := ruleSet(role.Rules); !slices.Equal(got, want) {
			t.Errorf("namespace %s rules:\n got %q\nwant %q", ns, got, want)
		}
		if rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != "strata-node-volumecommits" || len(rb.Subjects) != 1 ||
			rb.Subjects[0].Name != "strata-node" || rb.Subjects[0].Namespace != releaseNS {
			t.Errorf("namespace %s binding %+v", ns, rb)
		}
	}
	_, c := nodePlugin(t, nsObjs)
	if got := flag(t, flags(t, c.Args), "commit-namespaces"); got != "team-a,team-b" {
		t.Errorf("--commit-namespaces=%s, want team-a,team-b", got)
	}
	expectRefused(t, []refusal{
		{"namespaces without enabled", "volumeCommits: {namespaces: [team-a]}", "volumeCommits"},
		{"allowedRegistries without enabled", "volumeCommits: {allowedRegistries: [r.io]}", "volumeCommits"},
		{"a bad namespace", "volumeCommits: {enabled: true, namespaces: [Team_A]}", "namespaces"},
		{"a registry with a path", "volumeCommits: {enabled: true, allowedRegistries: [r.io/team]}", "allowedRegistries"},
	})

	var edit, view labeledRole
	objs.byName(t, "ClusterRole", "strata-volumecommits-edit", &edit)
	objs.byName(t, "ClusterRole", "strata-volumecommits-view", &view)
	l := edit.Metadata.Labels
	if l["rbac.authorization.k8s.io/aggregate-to-admin"] != "true" || l["rbac.authorization.k8s.io/aggregate-to-edit"] != "true" ||
		l["rbac.authorization.k8s.io/aggregate-to-view"] != "" {
		t.Errorf("edit role labels %v: want aggregated to admin and edit only", l)
	}
	got := ruleSet(edit.Rules)
	for _, v := range []string{"create", "get", "list", "watch", "delete"} {
		if !slices.Contains(got, "strata.csi.dev/volumecommits:"+v) {
			t.Errorf("edit role lacks %s: %q", v, got)
		}
	}
	for _, g := range got {
		if strings.Contains(g, "/status") || !strings.HasPrefix(g, "strata.csi.dev/volumecommits:") {
			t.Errorf("edit role grants %s: only the plugin writes status", g)
		}
	}
	if view.Metadata.Labels["rbac.authorization.k8s.io/aggregate-to-view"] != "true" {
		t.Errorf("view role labels %v", view.Metadata.Labels)
	}
	if got, want := ruleSet(view.Rules), []string{"strata.csi.dev/volumecommits:get", "strata.csi.dev/volumecommits:list",
		"strata.csi.dev/volumecommits:watch"}; !slices.Equal(got, want) {
		t.Errorf("view rules %q, want %q", got, want)
	}
}
