package chart

import (
	"testing"
)

// csiDriverCapacity is the CSIDriver's storageCapacity field.
type csiDriverCapacity struct {
	Spec struct {
		StorageCapacity *bool `yaml:"storageCapacity"`
	} `yaml:"spec"`
}

// TestStorageCapacity: by default the CSIDriver opts into capacity-aware
// scheduling, each node plugin publishes its node's CSIStorageCapacity
// objects in the release's namespace and the controller reads them, with
// exactly the RBAC that takes; storageCapacity.enabled: false turns all of
// it off.
func TestStorageCapacity(t *testing.T) {
	t.Parallel()
	const nodeSA = "strata-node"
	objs := render(t, "")
	var d csiDriverCapacity
	objs.one(t, "CSIDriver", &d)
	if d.Spec.StorageCapacity == nil || !*d.Spec.StorageCapacity {
		t.Errorf("CSIDriver storageCapacity %s, want true", ptrString(d.Spec.StorageCapacity))
	}
	_, c := nodePlugin(t, objs)
	f := flags(t, c.Args)
	if got := flag(t, f, "capacity-namespace"); got != releaseNS {
		t.Errorf("node plugin --capacity-namespace=%s, want the release's %s", got, releaseNS)
	}
	if got := flag(t, f, "capacity-poll-interval"); got != "1m" {
		t.Errorf("node plugin --capacity-poll-interval=%s, want 1m", got)
	}
	_, cc := controller(t, "")
	if got := flag(t, flags(t, cc.Args), "capacity-namespace"); got != releaseNS {
		t.Errorf("controller --capacity-namespace=%s, want %s", got, releaseNS)
	}

	roles := []struct {
		name, kind, namespace, account string
		want                           map[string][]string
	}{
		{"strata-node-capacity", "ClusterRole", "", nodeSA, map[string][]string{
			"/nodes": {"get"}, "storage.k8s.io/storageclasses": {"list", "watch"}}},
		{"strata-node-capacity", "Role", releaseNS, nodeSA, map[string][]string{
			"storage.k8s.io/csistoragecapacities": {"create", "delete", "list", "update"}}},
		{controllerName + "-capacity", "Role", releaseNS, controllerName, map[string][]string{
			"storage.k8s.io/csistoragecapacities": {"list", "watch"}}},
	}
	for _, r := range roles {
		var role clusterRole
		var found, bound bool
		for _, o := range objs.named(r.name) {
			switch o.Kind {
			case r.kind:
				found = true
				if o.Namespace != r.namespace {
					t.Errorf("%s %s in namespace %q, want %q", r.kind, r.name, o.Namespace, r.namespace)
				}
				o.decode(t, &role)
				checkRules(t, r.kind+" "+r.name, role.Rules, r.want)
			case r.kind + "Binding":
				bound = true
				var b clusterRoleBinding
				o.decode(t, &b)
				if o.Namespace != r.namespace || b.RoleRef.Kind != r.kind || b.RoleRef.Name != r.name || len(b.Subjects) != 1 ||
					b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != r.account || b.Subjects[0].Namespace != releaseNS {
					t.Errorf("%sBinding %s/%s: role %+v, subjects %+v; want %s %s for ServiceAccount %s/%s",
						r.kind, o.Namespace, o.Name, b.RoleRef, b.Subjects, r.kind, r.name, releaseNS, r.account)
				}
			}
		}
		if !found || !bound {
			t.Errorf("%s %s and its binding: found %v, bound %v", r.kind, r.name, found, bound)
		}
	}

	// A value sets the interval.
	_, c = nodePlugin(t, render(t, "storageCapacity: {pollInterval: 30s}"))
	if got := flag(t, flags(t, c.Args), "capacity-poll-interval"); got != "30s" {
		t.Errorf("storageCapacity.pollInterval 30s: --capacity-poll-interval=%s", got)
	}

	// Off: no objects, no flags, no grants.
	off := render(t, "storageCapacity: {enabled: false}")
	off.one(t, "CSIDriver", &d)
	if d.Spec.StorageCapacity == nil || *d.Spec.StorageCapacity {
		t.Errorf("storageCapacity.enabled false: CSIDriver storageCapacity %s, want false", ptrString(d.Spec.StorageCapacity))
	}
	_, c = nodePlugin(t, off)
	_, cc = controller(t, "storageCapacity: {enabled: false}")
	for what, args := range map[string][]string{"node plugin": c.Args, "controller": cc.Args} {
		f := flags(t, args)
		for _, name := range []string{"capacity-namespace", "capacity-poll-interval"} {
			if _, ok := f[name]; ok {
				t.Errorf("storageCapacity.enabled false: the %s has --%s", what, name)
			}
		}
	}
	for _, r := range roles {
		if got := off.named(r.name); len(got) > 0 {
			t.Errorf("storageCapacity.enabled false: %s still renders %v", r.name, got.kinds())
		}
	}
}

// TestStorageCapacityReusedValues: a release made before storageCapacity
// existed, upgraded with --reuse-values, keeps its old values and none of
// the chart's new defaults: the chart renders with those defaults rather
// than failing on a nil map.
func TestStorageCapacityReusedValues(t *testing.T) {
	t.Parallel()
	objs := render(t, "storageCapacity: null")
	var d csiDriverCapacity
	objs.one(t, "CSIDriver", &d)
	if d.Spec.StorageCapacity == nil || !*d.Spec.StorageCapacity {
		t.Errorf("CSIDriver storageCapacity %s without the value, want the default true", ptrString(d.Spec.StorageCapacity))
	}
	_, c := nodePlugin(t, objs)
	if got := flag(t, flags(t, c.Args), "capacity-poll-interval"); got != "1m" {
		t.Errorf("node plugin --capacity-poll-interval=%s without the value, want the default 1m", got)
	}
}
