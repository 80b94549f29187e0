package main

import (
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/driver/state"
)

// TestCommitUsage: commit says which volume it cannot commit, and why,
// with the usage exit code, before it contacts any registry.
func TestCommitUsage(t *testing.T) {
	root := t.TempDir()
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("b", 64)}
	for key, rec := range map[string]state.Record{
		"00000000000000000000000000000001": {VolumeID: "pv-a", TargetPath: "/pods/1/vol", Image: "127.0.0.1:1/x:v1", Digest: d, PodNamespace: "ns", PodName: "p1"},
		"00000000000000000000000000000002": {VolumeID: "pv-a", TargetPath: "/pods/2/vol", Image: "127.0.0.1:1/x:v1", Digest: d, PodNamespace: "ns", PodName: "p2"},
		"00000000000000000000000000000003": {VolumeID: "pv-ro", TargetPath: "/pods/3/vol", Image: "127.0.0.1:1/x:v1", Digest: d, ReadOnly: true},
		"00000000000000000000000000000004": {VolumeID: "pv-stack", TargetPath: "/pods/4/vol", Image: "127.0.0.1:1/x:v1", Digest: d,
			Stack: []state.StackImage{{Image: "127.0.0.1:1/x:v1", Digest: d}, {Image: "127.0.0.1:1/y:v1", Digest: d}}},
	} {
		publishRecord(t, root, key, rec)
	}
	for _, tc := range []struct {
		name  string
		args  []string
		code  int
		words []string
	}{
		{"one argument", []string{"pv-a"}, exitUsage, []string{"needs a volume and a target"}},
		{"unknown volume", []string{"nope", "127.0.0.1:1/out:v1"}, exitUsage, []string{`"nope"`, "strata ls"}},
		{"ambiguous", []string{"pv-a", "127.0.0.1:1/out:v1"}, exitUsage, []string{"published 2 times", "/pods/1/vol (pod ns/p1)", "--target-path"}},
		{"wrong target path", []string{"pv-a", "--target-path", "/pods/9/vol", "127.0.0.1:1/out:v1"}, exitUsage, []string{"/pods/9/vol"}},
		{"read-only", []string{"pv-ro", "127.0.0.1:1/out:v1"}, exitUsage, []string{"read-only"}},
		{"stacked", []string{"pv-stack", "127.0.0.1:1/out:v1"}, exitFailure, []string{"stacks 2 images", "single-image"}},
		{"digest target", []string{"ns/p1", "127.0.0.1:1/out@sha256:" + strings.Repeat("a", 64)}, exitUsage, []string{"give a tag"}},
		{"bad target", []string{"ns/p1", "UPPER/case:tag"}, exitUsage, []string{"TARGET_REF"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := strata(t, root, append([]string{"commit"}, tc.args...)...)
			expectCode(t, "commit "+strings.Join(tc.args, " "), r, tc.code)
			for _, w := range tc.words {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr %q does not say %q", r.stderr, w)
				}
			}
		})
	}
}
