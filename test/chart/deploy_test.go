package chart

import (
	"bytes"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestDeployIsFresh: deploy/strata.yaml is exactly what hack/render-deploy
// renders from the chart now.
func TestDeployIsFresh(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	cmd := exec.Command(filepath.Join(root, "hack", "render-deploy"), "--stdout")
	cmd.Dir = root
	cmd.Env = append(cmd.Environ(), "HELM="+helm(t))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	fresh, err := cmd.Output()
	if err != nil {
		t.Fatalf("hack/render-deploy --stdout: %v\n%s", err, stderr.Bytes())
	}
	committed := readFile(t, "deploy/strata.yaml")
	if !bytes.Equal(committed, fresh) {
		t.Fatalf("deploy/strata.yaml is stale: run hack/render-deploy (%s)", firstDifference(committed, fresh))
	}
	// It is a valid rendering: the same objects as the chart's defaults,
	// after the VolumeCommit CRD (helm template --include-crds puts the
	// chart's crds/ first), which plain-manifest installs need too.
	got, want := parseObjects(t, "deploy/strata.yaml", committed).kinds(), render(t, "").kinds()
	if want = append([]string{"CustomResourceDefinition"}, want...); !slices.Equal(got, want) {
		t.Errorf("deploy/strata.yaml holds %v, want the CRD and the chart's objects %v", got, want)
	}
}

// firstDifference describes the first line where a and b differ.
func firstDifference(a, b []byte) string {
	al, bl := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y || i >= len(al) || i >= len(bl) {
			return fmt.Sprintf("line %d is %q, the chart renders %q", i+1, x, y)
		}
	}
	return "no difference"
}

// The placeholders that the examples use, for scripts and tests to
// substitute.
const (
	datasetPlaceholder = "registry.local:5000/datasets/sample:v1"
	// The image that stacked.yaml stacks above the dataset.
	toolchainPlaceholder = "registry.local:5000/tools/toolchain:v1"
	shellImage           = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
)

// TestExamples: every example parses, holds the kinds it should, and its
// volumes are Strata volumes of the placeholder image with known attributes.
func TestExamples(t *testing.T) {
	t.Parallel()
	want := map[string][]string{
		"inline.yaml":    {"Pod"},
		"readonly.yaml":  {"Pod"},
		"subpath.yaml":   {"Pod"},
		"static-pv.yaml": {"PersistentVolume", "PersistentVolumeClaim", "Deployment"},
		"stacked.yaml":   {"Pod"},
	}
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "deploy", "examples", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, filepath.Base(f))
	}
	for name := range want {
		if !slices.Contains(names, name) {
			t.Errorf("deploy/examples/%s is missing", name)
		}
	}
	for _, name := range names {
		if _, ok := provisioningExamples[name]; ok {
			continue // TestProvisioningExamples
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			data := readFile(t, filepath.Join("deploy", "examples", name))
			header, _, _ := strings.Cut(string(data), "\napiVersion:")
			if !strings.Contains(header, datasetPlaceholder) {
				t.Errorf("the comment at the top does not name the placeholder image %s", datasetPlaceholder)
			}
			objs := parseObjects(t, name, data)
			kinds, ok := want[name]
			if !ok {
				t.Fatalf("unexpected example %s (kinds %v): add it to this test", name, objs.kinds())
			}
			if !slices.Equal(objs.kinds(), kinds) {
				t.Errorf("kinds %v, want %v", objs.kinds(), kinds)
			}
			var attrs []map[string]string // of every Strata volume in the file
			for _, o := range objs {
				attrs = append(attrs, checkExampleObject(t, o)...)
			}
			if len(attrs) == 0 {
				t.Fatal("no Strata volume")
			}
			for _, a := range attrs {
				if a["image"] != datasetPlaceholder {
					t.Errorf("volume image %q, want the placeholder %s", a["image"], datasetPlaceholder)
				}
				for k := range a {
					if k != "image" && k != "stackImages" && k != "pullPolicy" && k != "subPath" && k != "size" {
						t.Errorf("unknown volume attribute %q: the plugin refuses it", k)
					}
				}
			}
			if name == "subpath.yaml" && attrs[0]["subPath"] == "" {
				t.Error("no subPath attribute")
			}
			if name == "stacked.yaml" {
				if got := attrs[0]["stackImages"]; got != toolchainPlaceholder {
					t.Errorf("stackImages %q, want the placeholder %s", got, toolchainPlaceholder)
				}
				if !strings.Contains(header, toolchainPlaceholder) {
					t.Errorf("the comment at the top does not name the placeholder image %s", toolchainPlaceholder)
				}
			}
		})
	}
}

// checkExampleObject checks one object of an example and returns the
// volume attributes of the Strata volumes it declares.
func checkExampleObject(t *testing.T, o object) []map[string]string {
	t.Helper()
	switch o.Kind {
	case "Pod":
		var pod struct {
			Spec podSpec `yaml:"spec"`
		}
		o.decode(t, &pod)
		return checkExamplePod(t, o.Name, pod.Spec)
	case "Deployment":
		var d struct {
			Spec struct {
				Replicas int `yaml:"replicas"`
				Template struct {
					Spec podSpec `yaml:"spec"`
				} `yaml:"template"`
			} `yaml:"spec"`
		}
		o.decode(t, &d)
		if d.Spec.Replicas != 3 {
			t.Errorf("Deployment %s: %d replicas, want 3 (three private uppers)", o.Name, d.Spec.Replicas)
		}
		checkExamplePod(t, o.Name, d.Spec.Template.Spec)
		return nil
	case "PersistentVolume":
		var pv struct {
			Spec struct {
				AccessModes      []string `yaml:"accessModes"`
				StorageClassName *string  `yaml:"storageClassName"`
				CSI              *struct {
					csiVolumeSource `yaml:",inline"`
					VolumeHandle    string `yaml:"volumeHandle"`
				} `yaml:"csi"`
			} `yaml:"spec"`
		}
		o.decode(t, &pv)
		s := pv.Spec
		if s.CSI == nil || s.CSI.Driver != driverName || s.CSI.VolumeHandle == "" {
			t.Fatalf("PersistentVolume %s: csi %+v, want driver %s and a volumeHandle", o.Name, s.CSI, driverName)
		}
		if !slices.Equal(s.AccessModes, []string{"ReadWriteMany"}) {
			t.Errorf("PersistentVolume %s: accessModes %v, want [ReadWriteMany]", o.Name, s.AccessModes)
		}
		if s.StorageClassName == nil || *s.StorageClassName != "" {
			t.Errorf(`PersistentVolume %s: storageClassName %s, want "" (static)`, o.Name, ptrString(s.StorageClassName))
		}
		return []map[string]string{s.CSI.VolumeAttributes}
	case "PersistentVolumeClaim":
		var pvc struct {
			Spec struct {
				StorageClassName *string `yaml:"storageClassName"`
				VolumeName       string  `yaml:"volumeName"`
			} `yaml:"spec"`
		}
		o.decode(t, &pvc)
		if pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName != "" || pvc.Spec.VolumeName == "" {
			t.Errorf(`PersistentVolumeClaim %s: storageClassName %s, volumeName %q; want "" and the PV's name`,
				o.Name, ptrString(pvc.Spec.StorageClassName), pvc.Spec.VolumeName)
		}
		return nil
	}
	t.Errorf("unexpected kind %s", o.Kind)
	return nil
}

// checkExamplePod checks that every container mounts a volume the pod
// declares, that CSI volumes are Strata's, and that a read-only CSI volume is
// mounted read-only; it returns the Strata volumes' attributes.
func checkExamplePod(t *testing.T, name string, spec podSpec) []map[string]string {
	t.Helper()
	var attrs []map[string]string
	vols := map[string]volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
		if v.CSI != nil {
			if v.CSI.Driver != driverName {
				t.Errorf("%s: volume %s has driver %q, want %s", name, v.Name, v.CSI.Driver, driverName)
			}
			attrs = append(attrs, v.CSI.VolumeAttributes)
		}
	}
	for _, c := range spec.Containers {
		if c.Image != shellImage {
			t.Errorf("%s: container image %q, want %s", name, c.Image, shellImage)
		}
		for _, m := range c.VolumeMounts {
			v, ok := vols[m.Name]
			if !ok {
				t.Errorf("%s: container %s mounts volume %q, which the pod does not declare", name, c.Name, m.Name)
				continue
			}
			if v.CSI != nil && v.CSI.ReadOnly && !m.ReadOnly {
				t.Errorf("%s: read-only volume %s is mounted writable in container %s", name, m.Name, c.Name)
			}
		}
	}
	return attrs
}
