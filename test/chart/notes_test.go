package chart

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNotes: the pod that NOTES.txt offers as a first volume to try is a
// valid pod with a Strata inline volume. helm renders NOTES.txt only when it
// installs, so the test renders it through a copy of the chart where the
// notes are a named template inside a ConfigMap.
func TestNotes(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	chart := filepath.Join(t.TempDir(), "strata")
	if err := os.CopyFS(chart, os.DirFS(filepath.Join(root, chartDir))); err != nil {
		t.Fatal(err)
	}
	notes := filepath.Join(chart, "templates", "NOTES.txt")
	text, err := os.ReadFile(notes)
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"_notes.tpl": `{{- define "test.notes" -}}` + string(text) + `{{- end }}`,
		"notes.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include \"test.notes\" . | quote }}\n",
	} {
		if err := os.WriteFile(filepath.Join(chart, "templates", name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(notes); err != nil {
		t.Fatal(err)
	}
	out, err := runHelm(t, "template", "strata", chart, "--namespace", releaseNS, "--show-only", "templates/notes.yaml")
	if err != nil {
		t.Fatalf("render NOTES.txt: %v", err)
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	parseObjects(t, "NOTES.txt", out).one(t, "ConfigMap", &cm)
	rendered := cm.Data["notes"]

	// The pod between "<<'YAML'" and "YAML", indented by two spaces.
	_, after, ok := strings.Cut(rendered, "<<'YAML'\n")
	body, _, ok2 := strings.Cut(after, "\n  YAML\n")
	if !ok || !ok2 {
		t.Fatalf("NOTES.txt has no pod between <<'YAML' and YAML:\n%s", rendered)
	}
	var lines []string
	for _, l := range strings.Split(body, "\n") {
		lines = append(lines, strings.TrimPrefix(l, "  "))
	}
	objs := parseObjects(t, "the pod in NOTES.txt", []byte(strings.Join(lines, "\n")))
	var pod struct {
		Spec podSpec `yaml:"spec"`
	}
	objs.one(t, "Pod", &pod)
	var found bool
	for _, v := range pod.Spec.Volumes {
		if v.CSI != nil && v.CSI.Driver == driverName && v.CSI.VolumeAttributes["image"] != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("the pod in NOTES.txt has no %s volume with an image: %+v", driverName, pod.Spec.Volumes)
	}
	for _, want := range []string{"rollout status daemonset/strata-node", "kubectl describe pod"} {
		if !strings.Contains(rendered, want) {
			t.Errorf("NOTES.txt does not say %q", want)
		}
	}
}
