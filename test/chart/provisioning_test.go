package chart

import (
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// The controller's objects in the release "strata".
const controllerName = "strata-controller"

// named returns the objects called name.
func (objs objects) named(name string) objects {
	var out objects
	for _, o := range objs {
		if o.Name == name {
			out = append(out, o)
		}
	}
	return out
}

// controllerDeployment is the typed view of the controller's Deployment.
type controllerDeployment struct {
	Spec struct {
		Replicas *int `yaml:"replicas"`
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata struct {
				Labels map[string]string `yaml:"labels"`
			} `yaml:"metadata"`
			Spec podSpec `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

// podExtras are the pod fields that podSpec leaves out.
type podExtras struct {
	SecurityContext struct {
		RunAsNonRoot *bool `yaml:"runAsNonRoot"`
		RunAsUser    *int  `yaml:"runAsUser"`
	} `yaml:"securityContext"`
	Volumes []struct {
		Name     string    `yaml:"name"`
		EmptyDir *struct{} `yaml:"emptyDir"`
		HostPath any       `yaml:"hostPath"`
	} `yaml:"volumes"`
}

// controller renders the chart with values and returns the controller's
// Deployment and its only container.
func controller(t *testing.T, values string) (controllerDeployment, container) {
	d, _, c := controllerWithExtras(t, values)
	return d, c
}

// controllerWithExtras is controller, with the pod's extra fields.
func controllerWithExtras(t *testing.T, values string) (controllerDeployment, podExtras, container) {
	t.Helper()
	var d controllerDeployment
	var x struct {
		Spec struct {
			Template struct {
				Spec podExtras `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	o := render(t, values).one(t, "Deployment", &d)
	o.decode(t, &x)
	if o.Name != controllerName || o.Namespace != releaseNS {
		t.Errorf("Deployment %s/%s, want %s/%s", o.Namespace, o.Name, releaseNS, controllerName)
	}
	cs := d.Spec.Template.Spec.Containers
	if len(cs) != 1 || len(d.Spec.Template.Spec.InitContainers) != 0 {
		t.Fatalf("the controller runs %d containers and %d init containers; want one (it provisions in-process, no sidecars)",
			len(cs), len(d.Spec.Template.Spec.InitContainers))
	}
	return d, x.Spec.Template.Spec, cs[0]
}

// TestControllerDeployment: strata-csi --mode=controller, one replica, no
// host access, no privileges, leader election in the release's namespace,
// liveness through its own CSI socket.
func TestControllerDeployment(t *testing.T) {
	t.Parallel()
	d, extras, c := controllerWithExtras(t, "")
	spec := d.Spec.Template.Spec
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
		t.Errorf("replicas %s, want 1", ptrString(d.Spec.Replicas))
	}
	if d.Spec.Selector.MatchLabels["app.kubernetes.io/component"] != "controller" {
		t.Errorf("selector %v does not pick the controller's pods only", d.Spec.Selector.MatchLabels)
	}
	for k, v := range d.Spec.Selector.MatchLabels {
		if d.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("the pod template lacks the selector's label %s=%s", k, v)
		}
	}
	if spec.ServiceAccountName != controllerName {
		t.Errorf("serviceAccountName %q, want %s", spec.ServiceAccountName, controllerName)
	}
	if spec.HostNetwork {
		t.Error("the controller uses the host's network")
	}
	if c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged {
		t.Error("the controller is privileged")
	}
	if sc := extras.SecurityContext; sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		t.Errorf("pod securityContext %+v, want runAsNonRoot with a non-zero user", sc)
	}
	for _, v := range extras.Volumes {
		if v.HostPath != nil {
			t.Errorf("volume %s is a hostPath: the controller needs no host access", v.Name)
		}
	}
	if c.Image != "localhost/strata/strata-csi:0.1.0" {
		t.Errorf("image %q, want the node plugin's image", c.Image)
	}

	f := flags(t, c.Args)
	for name, want := range map[string]string{
		"mode":                      "controller",
		"endpoint":                  "unix:///csi/csi.sock",
		"health-address":            ":9808",
		"leader-election":           "true",
		"leader-election-namespace": releaseNS,
		"v":                         "2",
	} {
		if got := flag(t, f, name); got != want {
			t.Errorf("--%s=%s, want %s", name, got, want)
		}
	}
	for _, name := range []string{"node-id", "root", "kubelet-registration-dir", "provisioner"} {
		if v, ok := f[name]; ok {
			t.Errorf("--%s=%q given to the controller", name, v)
		}
	}
	defined := strataCSIFlags(t)
	for name := range f {
		if !defined[name] {
			t.Errorf("the controller gets --%s, which cmd/strata-csi does not define", name)
		}
	}
	// The socket's directory is an emptyDir: it serves only this process.
	var socketDir string
	for _, m := range c.VolumeMounts {
		if m.MountPath == "/csi" {
			socketDir = m.Name
		}
	}
	var emptyDir bool
	for _, v := range extras.Volumes {
		if v.Name == socketDir && v.EmptyDir != nil {
			emptyDir = true
		}
	}
	if !emptyDir {
		t.Errorf("the socket directory /csi is not an emptyDir (mounts %+v)", c.VolumeMounts)
	}
	p := c.LivenessProbe
	if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || probePort(t, c) != "9808" {
		t.Errorf("liveness probe %+v, want GET /healthz on the --health-address port 9808", p)
	}
	if want := map[string]string{"cpu": "10m", "memory": "32Mi"}; !reflect.DeepEqual(c.Resources.Requests, want) || len(c.Resources.Limits) != 0 {
		t.Errorf("resources %+v, want requests %v and no limits", c.Resources, want)
	}
}

// TestControllerRBAC: exactly the verbs the controller, the library and
// the resizer call, bound to the controller's own ServiceAccount; the Lease in the
// release's namespace only.
func TestControllerRBAC(t *testing.T) {
	t.Parallel()
	objs := render(t, "")
	mine := objs.named(controllerName)
	var sa struct{}
	if o := mine.one(t, "ServiceAccount", &sa); o.Namespace != releaseNS {
		t.Errorf("ServiceAccount in %q, want %s", o.Namespace, releaseNS)
	}
	var role clusterRole
	mine.one(t, "ClusterRole", &role)
	want := map[string][]string{ // "group/resource" -> verbs
		"/persistentvolumes":             {"create", "delete", "get", "list", "patch", "watch"},
		"/persistentvolumeclaims":        {"get", "list", "update", "watch"},
		"/persistentvolumeclaims/status": {"patch"}, // the resizer
		"storage.k8s.io/storageclasses":  {"list", "watch"},
		"/nodes":                         {"get", "list"},
		"storage.k8s.io/csinodes":        {"list"},
		"/events":                        {"create", "patch"},
	}
	checkRules(t, "ClusterRole "+controllerName, role.Rules, want)
	var binding clusterRoleBinding
	mine.one(t, "ClusterRoleBinding", &binding)
	checkBinding(t, binding, "ClusterRole", controllerName)

	le := objs.named(controllerName + "-leader-election")
	var leRole clusterRole
	if o := le.one(t, "Role", &leRole); o.Namespace != releaseNS {
		t.Errorf("leader election Role in %q, want %s", o.Namespace, releaseNS)
	}
	checkRules(t, "leader election Role", leRole.Rules, map[string][]string{"coordination.k8s.io/leases": {"create", "get", "update"}})
	var leBinding clusterRoleBinding
	if o := le.one(t, "RoleBinding", &leBinding); o.Namespace != releaseNS {
		t.Errorf("leader election RoleBinding in %q, want %s", o.Namespace, releaseNS)
	}
	checkBinding(t, leBinding, "Role", controllerName+"-leader-election")
}

// checkRules compares rules, as "group/resource" -> sorted verbs, with want,
// and refuses wildcards, resource names and non-resource URLs.
func checkRules(t *testing.T, what string, rules []policyRule, want map[string][]string) {
	t.Helper()
	got := map[string][]string{}
	for _, r := range rules {
		if len(r.NonResourceURLs) > 0 || len(r.ResourceNames) > 0 {
			t.Errorf("%s: rule %+v has non-resource URLs or resource names", what, r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				key := g + "/" + res
				if strings.Contains(key, "*") || slices.Contains(r.Verbs, "*") {
					t.Errorf("%s: rule %+v has a wildcard", what, r)
				}
				got[key] = append(got[key], r.Verbs...)
			}
		}
	}
	for k := range got {
		slices.Sort(got[k])
		got[k] = slices.Compact(got[k])
	}
	if !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("%s grants %v, want exactly %v", what, got, want)
	}
}

func checkBinding(t *testing.T, b clusterRoleBinding, kind, name string) {
	t.Helper()
	if b.RoleRef.Kind != kind || b.RoleRef.Name != name {
		t.Errorf("binding refers to %s %s, want %s %s", b.RoleRef.Kind, b.RoleRef.Name, kind, name)
	}
	if len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != controllerName || b.Subjects[0].Namespace != releaseNS {
		t.Errorf("binding subjects %+v, want only ServiceAccount %s/%s", b.Subjects, releaseNS, controllerName)
	}
}

// TestControllerValues: each controller value changes what it should.
func TestControllerValues(t *testing.T) {
	t.Parallel()
	t.Run("disabled", func(t *testing.T) {
		t.Parallel()
		objs := render(t, "controller: {enabled: false, replicas: 1, leaderElection: true}")
		for _, o := range objs {
			if strings.HasPrefix(o.Name, controllerName) || o.Kind == "Deployment" {
				t.Errorf("%s %s rendered with the controller disabled", o.Kind, o.Name)
			}
		}
	})
	t.Run("no leader election", func(t *testing.T) {
		t.Parallel()
		objs := render(t, "controller: {enabled: true, replicas: 1, leaderElection: false}")
		var d controllerDeployment
		o := objs.one(t, "Deployment", &d)
		f := flags(t, d.Spec.Template.Spec.Containers[0].Args)
		if flag(t, f, "leader-election") != "false" {
			t.Errorf("--leader-election=%s, want false", flag(t, f, "leader-election"))
		}
		if _, ok := f["leader-election-namespace"]; ok {
			t.Error("--leader-election-namespace without leader election")
		}
		if le := objs.named(controllerName + "-leader-election"); len(le) != 0 {
			t.Errorf("leader election RBAC %v without leader election (%s)", le.kinds(), o.Name)
		}
	})
	t.Run("replicas resources scheduling", func(t *testing.T) {
		t.Parallel()
		d, c := controller(t, `controller:
  enabled: true
  replicas: 2
  leaderElection: true
  resources: {requests: {cpu: 50m}, limits: {memory: 128Mi}}
  nodeSelector: {node-role.kubernetes.io/control-plane: ""}
  tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
logLevel: 4`)
		spec := d.Spec.Template.Spec
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
			t.Errorf("replicas %s, want 2", ptrString(d.Spec.Replicas))
		}
		if !reflect.DeepEqual(c.Resources.Requests, map[string]string{"cpu": "50m", "memory": "32Mi"}) || !reflect.DeepEqual(c.Resources.Limits, map[string]string{"memory": "128Mi"}) {
			t.Errorf("resources %+v", c.Resources)
		}
		if want := map[string]string{"kubernetes.io/os": "linux", "node-role.kubernetes.io/control-plane": ""}; !reflect.DeepEqual(spec.NodeSelector, want) {
			t.Errorf("nodeSelector %v, want %v", spec.NodeSelector, want)
		}
		if want := []map[string]string{{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}}; !reflect.DeepEqual(spec.Tolerations, want) {
			t.Errorf("tolerations %v, want %v", spec.Tolerations, want)
		}
		if v := flag(t, flags(t, c.Args), "v"); v != "4" {
			t.Errorf("--v=%s, want the chart's logLevel 4", v)
		}
	})
}

// storageClass is the typed view of a StorageClass.
type storageClass struct {
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Provisioner          string            `yaml:"provisioner"`
	Parameters           map[string]string `yaml:"parameters"`
	ReclaimPolicy        string            `yaml:"reclaimPolicy"`
	AllowVolumeExpansion *bool             `yaml:"allowVolumeExpansion"`
	VolumeBindingMode    string            `yaml:"volumeBindingMode"`
}

// TestStorageClasses: none by default; each listed class with the driver
// as provisioner, its image and parameters, WaitForFirstConsumer and
// Delete unless told otherwise, and expansion unless told otherwise.
func TestStorageClasses(t *testing.T) {
	t.Parallel()
	if n := len(render(t, "").named("sample")); n != 0 || slices.Contains(render(t, "").kinds(), "StorageClass") {
		t.Error("a StorageClass is rendered by default")
	}
	objs := render(t, `storageClasses:
  - name: sample
    image: registry.local:5000/datasets/sample:v1
  - name: train-private
    image: registry.local:5000/datasets/private:v2
    parameters:
      pullPolicy: Always
      subPath: data/train
      csi.storage.k8s.io/node-publish-secret-name: "${pvc.name}-pull"
      csi.storage.k8s.io/node-publish-secret-namespace: "${pvc.namespace}"
    reclaimPolicy: Retain
    allowVolumeExpansion: false
    volumeBindingMode: Immediate`)
	want := map[string]storageClass{
		"sample": {Provisioner: driverName, Parameters: map[string]string{"image": "registry.local:5000/datasets/sample:v1"},
			ReclaimPolicy: "Delete", VolumeBindingMode: "WaitForFirstConsumer"},
		"train-private": {Provisioner: driverName, Parameters: map[string]string{
			"image": "registry.local:5000/datasets/private:v2", "pullPolicy": "Always", "subPath": "data/train",
			"csi.storage.k8s.io/node-publish-secret-name": "${pvc.name}-pull", "csi.storage.k8s.io/node-publish-secret-namespace": "${pvc.namespace}",
		}, ReclaimPolicy: "Retain", VolumeBindingMode: "Immediate"},
	}
	var found int
	for _, o := range objs {
		if o.Kind != "StorageClass" {
			continue
		}
		found++
		var sc storageClass
		o.decode(t, &sc)
		if o.Namespace != "" {
			t.Errorf("StorageClass %s has namespace %q", o.Name, o.Namespace)
		}
		w, ok := want[o.Name]
		if !ok {
			t.Errorf("unexpected StorageClass %s", o.Name)
			continue
		}
		// Clones grow online: expansion is on unless the class says no.
		if wantExp := o.Name == "sample"; sc.AllowVolumeExpansion == nil || *sc.AllowVolumeExpansion != wantExp {
			t.Errorf("StorageClass %s: allowVolumeExpansion %s, want %v", o.Name, ptrString(sc.AllowVolumeExpansion), wantExp)
		}
		sc.Metadata.Name, sc.AllowVolumeExpansion = "", nil
		if !reflect.DeepEqual(sc, w) {
			t.Errorf("StorageClass %s: %+v, want %+v", o.Name, sc, w)
		}
	}
	if found != len(want) {
		t.Errorf("%d StorageClasses, want %d", found, len(want))
	}
}

// TestProvisioningSchemaRejects: bad controller and StorageClass values
// fail with a message that names them.
func TestProvisioningSchemaRejects(t *testing.T) {
	t.Parallel()
	expectRefused(t, []refusal{
		{"controller unknown key", "controller: {enabled: true, replicas: 1, leaderElection: true, replica: 2}", "replica"},
		{"controller replicas negative", "controller: {enabled: true, replicas: -1, leaderElection: true}", "replicas"},
		{"controller enabled a string", "controller: {enabled: \"yes\", replicas: 1, leaderElection: true}", "enabled"},
		{"controller toleration operator", "controller: {enabled: true, replicas: 1, leaderElection: true, tolerations: [{operator: Maybe}]}", "operator"},
		{"storage class without image", "storageClasses: [{name: sample}]", "image"},
		{"storage class without name", "storageClasses: [{image: r/x:v1}]", "name"},
		{"storage class bad name", "storageClasses: [{name: Sample_1, image: r/x:v1}]", "name"},
		{"image among the parameters", "storageClasses: [{name: s, image: r/x:v1, parameters: {image: r/y:v1}}]", "image"},
		{"unknown parameter", "storageClasses: [{name: s, image: r/x:v1, parameters: {pullpolicy: Always}}]", "pullpolicy"},
		{"pull policy", "storageClasses: [{name: s, image: r/x:v1, parameters: {pullPolicy: Sometimes}}]", "pullPolicy"},
		{"reclaim policy", "storageClasses: [{name: s, image: r/x:v1, reclaimPolicy: Recycle}]", "reclaimPolicy"},
		{"expansion not a bool", "storageClasses: [{name: s, image: r/x:v1, allowVolumeExpansion: \"yes\"}]", "allowVolumeExpansion"},
		{"binding mode", "storageClasses: [{name: s, image: r/x:v1, volumeBindingMode: Later}]", "volumeBindingMode"},
		{"storage classes not a list", "storageClasses: {name: s}", "storageClasses"},
	})
}

// TestProvisioningLint: helm lint --strict with the controller's options and
// a StorageClass.
func TestProvisioningLint(t *testing.T) {
	t.Parallel()
	values := "controller: {enabled: true, replicas: 2, leaderElection: true, tolerations: [{operator: Exists}]}\n" +
		"storageClasses: [{name: sample, image: registry.local:5000/datasets/sample:v1, parameters: {subPath: data}}]"
	if out, err := runHelm(t, "lint", "--strict", chartDir, "-f", valuesFile(t, values)); err != nil {
		t.Errorf("helm lint --strict: %v\n%s", err, out)
	}
}

// provisioningExamples are the examples of dynamic provisioning, checked
// here rather than by TestExamples: their volumes are claims of the class
// strata-sample, not csi volumes.
var provisioningExamples = map[string][]string{
	"storageclass.yaml":    {"StorageClass", "PersistentVolumeClaim", "Pod"},
	"statefulset.yaml":     {"StatefulSet"},
	"ephemeral-clone.yaml": {"Pod"},
	"clone-of-claim.yaml":  {"PersistentVolumeClaim", "Pod"},
}

// exampleClass is the StorageClass of the examples.
const exampleClass = "strata-sample"

// claimSpec is the typed view of a claim's spec.
type claimSpec struct {
	StorageClassName *string  `yaml:"storageClassName"`
	AccessModes      []string `yaml:"accessModes"`
	Resources        struct {
		Requests map[string]string `yaml:"requests"`
	} `yaml:"resources"`
	DataSource *struct {
		Kind string `yaml:"kind"`
		Name string `yaml:"name"`
	} `yaml:"dataSource"`
}

// TestProvisioningExamples: the class of the dataset image placeholder with
// WaitForFirstConsumer, and claims of it (a PVC, a StatefulSet's
// volumeClaimTemplates, a generic ephemeral volume) that pods mount.
func TestProvisioningExamples(t *testing.T) {
	t.Parallel()
	for name, kinds := range provisioningExamples {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			data := readFile(t, filepath.Join("deploy", "examples", name))
			header, _, _ := strings.Cut(string(data), "\napiVersion:")
			if !strings.Contains(header, datasetPlaceholder) {
				t.Errorf("the comment at the top does not name the placeholder image %s", datasetPlaceholder)
			}
			objs := parseObjects(t, name, data)
			if !slices.Equal(objs.kinds(), kinds) {
				t.Fatalf("kinds %v, want %v", objs.kinds(), kinds)
			}
			claims := map[string]claimSpec{} // declared claims, by name
			var mounted []string             // claim names or templates that pods mount
			for _, o := range objs {
				switch o.Kind {
				case "StorageClass":
					var sc storageClass
					o.decode(t, &sc)
					if o.Name != exampleClass || sc.Provisioner != driverName || sc.VolumeBindingMode != "WaitForFirstConsumer" {
						t.Errorf("StorageClass %s: provisioner %q, binding %q; want %s, %s, WaitForFirstConsumer", o.Name, sc.Provisioner, sc.VolumeBindingMode, exampleClass, driverName)
					}
					if sc.Parameters["image"] != datasetPlaceholder {
						t.Errorf("StorageClass image %q, want the placeholder %s", sc.Parameters["image"], datasetPlaceholder)
					}
					for k := range sc.Parameters {
						if k != "image" && k != "pullPolicy" && k != "subPath" && k != "stackImages" {
							t.Errorf("StorageClass parameter %q is not a volume attribute", k)
						}
					}
				case "PersistentVolumeClaim":
					var pvc struct {
						Spec claimSpec `yaml:"spec"`
					}
					o.decode(t, &pvc)
					claims[o.Name] = pvc.Spec
				case "Pod":
					var pod struct {
						Spec podSpec `yaml:"spec"`
					}
					var vols struct {
						Spec struct {
							Volumes []exampleVolume `yaml:"volumes"`
						} `yaml:"spec"`
					}
					o.decode(t, &pod)
					o.decode(t, &vols)
					mounted = append(mounted, checkClaimPod(t, o.Name, pod.Spec, vols.Spec.Volumes, claims)...)
				case "StatefulSet":
					var ss struct {
						Spec struct {
							Replicas *int `yaml:"replicas"`
							Template struct {
								Spec podSpec `yaml:"spec"`
							} `yaml:"template"`
							VolumeClaimTemplates []struct {
								Metadata struct {
									Name string `yaml:"name"`
								} `yaml:"metadata"`
								Spec claimSpec `yaml:"spec"`
							} `yaml:"volumeClaimTemplates"`
						} `yaml:"spec"`
					}
					o.decode(t, &ss)
					if ss.Spec.Replicas == nil || *ss.Spec.Replicas != 3 {
						t.Errorf("StatefulSet %s: replicas %s, want 3 (three clones)", o.Name, ptrString(ss.Spec.Replicas))
					}
					for _, tmpl := range ss.Spec.VolumeClaimTemplates {
						claims[tmpl.Metadata.Name] = tmpl.Spec
					}
					mounted = append(mounted, checkClaimPod(t, o.Name, ss.Spec.Template.Spec, nil, claims)...)
				}
			}
			if len(mounted) == 0 {
				t.Fatal("no pod mounts a claim of the class")
			}
			for _, c := range mounted {
				spec, ok := claims[c]
				if !ok {
					t.Errorf("claim %q is mounted but not declared", c)
					continue
				}
				if spec.StorageClassName == nil || *spec.StorageClassName != exampleClass {
					t.Errorf("claim %s: storageClassName %s, want %s", c, ptrString(spec.StorageClassName), exampleClass)
				}
				if !slices.Equal(spec.AccessModes, []string{"ReadWriteOnce"}) || spec.Resources.Requests["storage"] == "" {
					t.Errorf("claim %s: accessModes %v, requests %v; want [ReadWriteOnce] and a storage request", c, spec.AccessModes, spec.Resources.Requests)
				}
				// A clone of a claim clones the claim of storageclass.yaml.
				if ds := spec.DataSource; ds != nil && (ds.Kind != "PersistentVolumeClaim" || ds.Name != "strata-clone") {
					t.Errorf("claim %s: dataSource %+v, want the claim strata-clone of storageclass.yaml", c, *ds)
				}
			}
		})
	}
}

// exampleVolume is a pod volume with the sources the examples use.
type exampleVolume struct {
	Name                  string           `yaml:"name"`
	CSI                   *csiVolumeSource `yaml:"csi"`
	PersistentVolumeClaim *struct {
		ClaimName string `yaml:"claimName"`
	} `yaml:"persistentVolumeClaim"`
	Ephemeral *struct {
		VolumeClaimTemplate struct {
			Spec claimSpec `yaml:"spec"`
		} `yaml:"volumeClaimTemplate"`
	} `yaml:"ephemeral"`
}

// checkClaimPod checks a pod of a provisioning example: the shell image,
// mounts of declared volumes, no inline csi volume. A generic ephemeral
// volume's template is added to claims under the volume's name. It returns
// the claims the pod mounts: PVC names, ephemeral volumes, and (for a
// StatefulSet, whose volumes are its claim templates) mount names.
func checkClaimPod(t *testing.T, name string, spec podSpec, vols []exampleVolume, claims map[string]claimSpec) []string {
	t.Helper()
	byName := map[string]exampleVolume{}
	for _, v := range vols {
		byName[v.Name] = v
		if v.CSI != nil {
			t.Errorf("%s: volume %s is an inline csi volume; this example provisions claims", name, v.Name)
		}
		if v.Ephemeral != nil {
			claims[v.Name] = v.Ephemeral.VolumeClaimTemplate.Spec
		}
	}
	var mounted []string
	for _, c := range spec.Containers {
		if c.Image != shellImage {
			t.Errorf("%s: container image %q, want %s", name, c.Image, shellImage)
		}
		for _, m := range c.VolumeMounts {
			v, ok := byName[m.Name]
			switch {
			case vols == nil: // a StatefulSet: mounts name claim templates
				mounted = append(mounted, m.Name)
			case !ok:
				t.Errorf("%s: container %s mounts volume %q, which the pod does not declare", name, c.Name, m.Name)
			case v.PersistentVolumeClaim != nil:
				mounted = append(mounted, v.PersistentVolumeClaim.ClaimName)
			case v.Ephemeral != nil:
				mounted = append(mounted, v.Name)
			}
		}
	}
	return mounted
}

// withoutController drops the controller's objects, for the tests of the
// node plugin's.
func (objs objects) withoutController() objects {
	var out objects
	for _, o := range objs {
		if !strings.HasPrefix(o.Name, controllerName) {
			out = append(out, o)
		}
	}
	return out
}

// TestControllerSpreads: by default the controller's replicas prefer
// different nodes (a standby outlives its leader's node) without requiring
// it; controller.affinity replaces that rule.
func TestControllerSpreads(t *testing.T) {
	t.Parallel()
	type term struct {
		Weight          int `yaml:"weight"`
		PodAffinityTerm struct {
			TopologyKey   string `yaml:"topologyKey"`
			LabelSelector struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"labelSelector"`
		} `yaml:"podAffinityTerm"`
	}
	type deployment[A any] struct {
		Spec struct {
			Selector struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"selector"`
			Template struct {
				Spec struct {
					Affinity A `yaml:"affinity"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	var d deployment[map[string]map[string][]term]
	render(t, "").one(t, "Deployment", &d)
	aff := d.Spec.Template.Spec.Affinity
	anti := aff["podAntiAffinity"]
	if len(aff) != 1 || len(anti) != 1 || len(anti["preferredDuringSchedulingIgnoredDuringExecution"]) != 1 {
		t.Fatalf("default affinity %+v: want one preferred podAntiAffinity term, nothing required", aff)
	}
	p := anti["preferredDuringSchedulingIgnoredDuringExecution"][0]
	if p.Weight != 100 || p.PodAffinityTerm.TopologyKey != "kubernetes.io/hostname" ||
		!maps.Equal(p.PodAffinityTerm.LabelSelector.MatchLabels, d.Spec.Selector.MatchLabels) {
		t.Errorf("anti-affinity term %+v: want weight 100 on kubernetes.io/hostname, selecting the Deployment's own pods %v",
			p, d.Spec.Selector.MatchLabels)
	}

	var set deployment[map[string]any]
	render(t, "controller: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: pool, operator: In, values: [system]}]}]}}}}").
		one(t, "Deployment", &set)
	if aff := set.Spec.Template.Spec.Affinity; len(aff) != 1 || aff["nodeAffinity"] == nil {
		t.Errorf("with controller.affinity set: affinity %+v, want the value's nodeAffinity alone", aff)
	}
}
