package chart

import (
	"slices"
	"testing"
)

// TestNodeReadsPersistentVolumes: the node plugin removes the persistent
// clones whose PersistentVolume was deleted, so its ClusterRole (the one
// bound to the DaemonSet's ServiceAccount) reads PersistentVolumes: get,
// list and watch in one rule (an informer), and no role of the node plugin
// writes them.
func TestNodeReadsPersistentVolumes(t *testing.T) {
	t.Parallel()
	objs := render(t, "")
	ds, _ := nodePlugin(t, objs)
	account := ds.Spec.Template.Spec.ServiceAccountName
	var roles []string
	for _, o := range objs {
		if o.Kind != "ClusterRoleBinding" {
			continue
		}
		var b clusterRoleBinding
		o.decode(t, &b)
		for _, s := range b.Subjects {
			if s.Kind == "ServiceAccount" && s.Name == account && s.Namespace == releaseNS && b.RoleRef.Kind == "ClusterRole" {
				roles = append(roles, b.RoleRef.Name)
			}
		}
	}
	var got [][]string
	for _, o := range objs {
		if o.Kind != "ClusterRole" || !slices.Contains(roles, o.Name) {
			continue
		}
		var role clusterRole
		o.decode(t, &role)
		for _, r := range role.Rules {
			if slices.Contains(r.Resources, "persistentvolumes") {
				if !slices.Equal(r.APIGroups, []string{""}) || len(r.ResourceNames) > 0 {
					t.Errorf("ClusterRole %s: rule %+v: want the core group and no resource names", o.Name, r)
				}
				got = append(got, r.Verbs)
			}
		}
	}
	if len(roles) == 0 {
		t.Fatalf("no ClusterRole is bound to the node plugin's ServiceAccount %s", account)
	}
	watch := false
	for _, verbs := range got {
		watch = watch || slices.Equal(verbs, []string{"get", "list", "watch"})
		for _, v := range verbs {
			if !slices.Contains([]string{"get", "list", "watch"}, v) {
				t.Errorf("the node plugin's ClusterRoles %v grant %q on persistentvolumes; it only reads them", roles, v)
			}
		}
	}
	if !watch {
		t.Errorf("the node plugin's ClusterRoles %v grant persistentvolumes %v, want a rule of get, list, watch", roles, got)
	}
}
