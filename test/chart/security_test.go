package chart

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

// grant is one rule of a Role or ClusterRole on one resource, as
// docs/security.md lists it: "object | verbs | resources | scope".
type grant struct {
	Object   string // "ClusterRole strata-node", "Role strata-node-pull-secrets"
	Verbs    string // sorted, ", "-separated
	Resource string // "events", "events.k8s.io/events", "serviceaccounts (name strata-pull-secrets)"
	Scope    string // "cluster", "namespace NS", "aggregated into admin, edit"
}

func (g grant) String() string {
	return g.Object + " | " + g.Verbs + " | " + g.Resource + " | " + g.Scope
}

// roleObject is a Role or ClusterRole, as much as grants need.
type roleObject struct {
	Metadata struct {
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Rules []policyRule `yaml:"rules"`
}

// grants flattens every rule of every Role and ClusterRole of objs.
func grants(t *testing.T, objs objects) []string {
	t.Helper()
	var out []string
	for _, o := range objs {
		if o.Kind != "Role" && o.Kind != "ClusterRole" {
			continue
		}
		var r roleObject
		o.decode(t, &r)
		scope := "cluster"
		if o.Kind == "Role" {
			scope = "namespace " + o.Namespace
		} else {
			var into []string
			for _, role := range []string{"admin", "edit", "view"} {
				if r.Metadata.Labels["rbac.authorization.k8s.io/aggregate-to-"+role] == "true" {
					into = append(into, role)
				}
			}
			if len(into) > 0 {
				scope = "aggregated into " + strings.Join(into, ", ")
			}
		}
		for _, rule := range r.Rules {
			if len(rule.NonResourceURLs) > 0 {
				t.Errorf("%s %s grants non-resource URLs %q", o.Kind, o.Name, rule.NonResourceURLs)
			}
			verbs := slices.Sorted(slices.Values(rule.Verbs))
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					if g != "" {
						res = g + "/" + res
					}
					if len(rule.ResourceNames) > 0 {
						res += " (name " + strings.Join(rule.ResourceNames, ", ") + ")"
					}
					out = append(out, grant{Object: o.Kind + " " + o.Name, Verbs: strings.Join(verbs, ", "), Resource: res, Scope: scope}.String())
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// documentedGrants parses the section "## RBAC: every rule the chart grants"
// of docs/security.md: a table per "### " heading, keyed by the heading.
func documentedGrants(t *testing.T) map[string][]string {
	t.Helper()
	doc := string(readFile(t, "docs/security.md"))
	// The section may be numbered ("## 3. RBAC: ...").
	loc := regexp.MustCompile(`(?m)^## (\d+\. )?RBAC: every rule the chart grants\n`).FindStringIndex(doc)
	if loc == nil {
		t.Fatal(`docs/security.md has no section "## RBAC: every rule the chart grants"`)
	}
	body := doc[loc[1]:]
	if j := strings.Index(body, "\n## "); j >= 0 {
		body = body[:j]
	}
	out := map[string][]string{}
	heading := ""
	for _, line := range strings.Split(body, "\n") {
		if h, ok := strings.CutPrefix(line, "### "); ok {
			heading = strings.TrimSpace(h)
			continue
		}
		if !strings.HasPrefix(line, "|") || heading == "" {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for k := range cells {
			cells[k] = strings.TrimSpace(strings.ReplaceAll(cells[k], "`", ""))
		}
		if len(cells) != 5 {
			t.Fatalf("docs/security.md, %s: row %q has %d cells, want object | verbs | resources | scope | why", heading, line, len(cells))
		}
		if cells[0] == "object" || strings.HasPrefix(cells[0], "---") {
			continue
		}
		if cells[4] == "" {
			t.Errorf("docs/security.md, %s: row %q does not say why", heading, line)
		}
		verbs := strings.Split(cells[1], ",")
		for k := range verbs {
			verbs[k] = strings.TrimSpace(verbs[k])
		}
		slices.Sort(verbs)
		out[heading] = append(out[heading], grant{Object: cells[0], Verbs: strings.Join(verbs, ", "), Resource: cells[2], Scope: cells[3]}.String())
	}
	for h := range out {
		slices.Sort(out[h])
	}
	return out
}

// optIn is a heading "With `key.path: value`": the values it renders; value
// is a scalar or a YAML flow mapping or list.
var optIn = regexp.MustCompile("^With `([a-zA-Z.]+): ([a-z0-9]+|\\{.+\\}|\\[.+\\])`$")

// valuesOf turns "a.b.c", "v" into the YAML "a: {b: {c: v}}".
func valuesOf(path, value string) string {
	keys := strings.Split(path, ".")
	out := value
	for k := len(keys) - 1; k >= 0; k-- {
		out = "{" + keys[k] + ": " + out + "}"
	}
	return strings.TrimSuffix(strings.TrimPrefix(out, "{"), "}")
}

// TestRBACDocumented: docs/security.md lists every rule the chart grants,
// exactly: the default install's under "### Default install", and under
// "### With `VALUE: true`" exactly those that the value adds (an opt-in
// value only adds). Every row says why.
func TestRBACDocumented(t *testing.T) {
	t.Parallel()
	doc := documentedGrants(t)
	def, ok := doc["Default install"]
	if !ok {
		t.Fatal("docs/security.md lists no \"### Default install\"")
	}
	base := grants(t, render(t, ""))
	diff(t, "the default install", base, def)
	seen := 0
	for h, rows := range doc {
		if h == "Default install" {
			continue
		}
		m := optIn.FindStringSubmatch(h)
		if m == nil {
			t.Errorf("docs/security.md: heading %q is neither \"Default install\" nor \"With `key: value`\"", h)
			continue
		}
		seen++
		got := grants(t, render(t, valuesOf(m[1], m[2])))
		var added []string
		for _, g := range got {
			if !slices.Contains(base, g) {
				added = append(added, g)
			}
		}
		for _, g := range base {
			if !slices.Contains(got, g) {
				t.Errorf("%s: removes %s", h, g)
			}
		}
		diff(t, h, added, rows)
	}
	for _, v := range []string{"volumeCommits.enabled", "podIdentity.enabled"} {
		if _, ok := doc["With `"+v+": true`"]; !ok {
			t.Errorf("docs/security.md has no \"### With `%s: true`\"", v)
		}
	}
	if seen == 0 {
		t.Error("docs/security.md lists no opt-in value")
	}
}

// diff reports the rules the chart grants that the docs do not list, and
// the reverse.
func diff(t *testing.T, what string, chart, docs []string) {
	t.Helper()
	for _, g := range chart {
		if !slices.Contains(docs, g) {
			t.Errorf("%s: the chart grants %q, which docs/security.md does not list", what, g)
		}
	}
	for _, g := range docs {
		if !slices.Contains(chart, g) {
			t.Errorf("%s: docs/security.md lists %q, which the chart does not grant", what, g)
		}
	}
}

// TestNoClusterWideSecrets: the default install reads no secret outside
// the dedicated pull-secrets namespace: no ClusterRole grants any verb on
// secrets, no Role in the release's namespace (kube-system) does, and the
// one Role that does lists and watches (never gets) in the pull-secrets
// namespace. Turning VolumeCommits on adds a cluster-wide get, and only
// that (TestRBACDocumented holds the rest to docs/security.md).
func TestNoClusterWideSecrets(t *testing.T) {
	t.Parallel()
	onSecrets := func(g string) bool {
		f := strings.Split(g, " | ")
		return f[2] == "secrets" || strings.HasPrefix(f[2], "secrets ") || strings.Contains(f[2], "*")
	}
	var secretGrants []string
	for _, g := range grants(t, render(t, "")) {
		if onSecrets(g) {
			secretGrants = append(secretGrants, g)
		}
	}
	want := []string{"Role strata-node-pull-secrets | list, watch | secrets | namespace " + pullSecretsNS}
	if !slices.Equal(secretGrants, want) {
		t.Errorf("the default install grants on secrets:\n %q\nwant only\n %q", secretGrants, want)
	}
	if pullSecretsNS == releaseNS {
		t.Fatal("the pull secrets namespace is the release's")
	}
	secretGrants = nil
	for _, g := range grants(t, render(t, "volumeCommits: {enabled: true}")) {
		if onSecrets(g) {
			secretGrants = append(secretGrants, g)
		}
	}
	want = append(want, "ClusterRole strata-node-volumecommits | get | secrets | cluster")
	slices.Sort(want)
	if !slices.Equal(secretGrants, want) {
		t.Errorf("with VolumeCommits, grants on secrets:\n %q\nwant\n %q", secretGrants, want)
	}
	// With volumeCommits.namespaces, a get in each of them, and no
	// cluster-wide grant.
	secretGrants = nil
	for _, g := range grants(t, render(t, "volumeCommits: {enabled: true, namespaces: [team-a, team-b]}")) {
		if onSecrets(g) {
			secretGrants = append(secretGrants, g)
		}
	}
	want = []string{"Role strata-node-pull-secrets | list, watch | secrets | namespace " + pullSecretsNS,
		"Role strata-node-volumecommits | get | secrets | namespace team-a",
		"Role strata-node-volumecommits | get | secrets | namespace team-b"}
	slices.Sort(want)
	if !slices.Equal(secretGrants, want) {
		t.Errorf("with VolumeCommits in team-a and team-b, grants on secrets:\n %q\nwant\n %q", secretGrants, want)
	}
	// No RoleBinding lends a ClusterRole's rights in a namespace.
	for _, o := range render(t, "volumeCommits: {enabled: true, namespaces: [team-a]}\npodIdentity: {enabled: true}") {
		if o.Kind != "RoleBinding" {
			continue
		}
		var b clusterRoleBinding
		o.decode(t, &b)
		if b.RoleRef.Kind != "Role" || b.RoleRef.Name != o.Name {
			t.Errorf("RoleBinding %s/%s binds %s %s", o.Namespace, o.Name, b.RoleRef.Kind, b.RoleRef.Name)
		}
		if len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Namespace != releaseNS ||
			b.Subjects[0].Name != "strata-node" && b.Subjects[0].Name != controllerName {
			t.Errorf("RoleBinding %s/%s binds %+v, want only the plugin's or the controller's ServiceAccount", o.Namespace, o.Name, b.Subjects)
		}
	}
}
