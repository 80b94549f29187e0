package chart

import "testing"

// TestDefaultUpperSize: volumes.defaultUpperSize becomes the node plugin's
// --default-upper-size, 10Gi unless set; 0 turns the default cap off.
func TestDefaultUpperSize(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ values, want string }{
		{"", "10Gi"},
		{"volumes: {defaultUpperSize: 512Mi}", "512Mi"},
		{"volumes: {defaultUpperSize: 1.5Gi}", "1.5Gi"},
		{"volumes: {defaultUpperSize: 0}", "0"},
		{`volumes: {defaultUpperSize: "0"}`, "0"},
	} {
		_, c := nodePlugin(t, render(t, tc.values))
		if got := flag(t, flags(t, c.Args), "default-upper-size"); got != tc.want {
			t.Errorf("values %q: --default-upper-size=%s, want %s", tc.values, got, tc.want)
		}
	}
	expectRefused(t, []refusal{
		{"upper size not a quantity", "volumes: {defaultUpperSize: 5GB}", "defaultUpperSize"},
		{"upper size a word", "volumes: {defaultUpperSize: lots}", "defaultUpperSize"},
		{"upper size a number of bytes", "volumes: {defaultUpperSize: 1073741824}", "defaultUpperSize"},
		{"unknown volumes key", "volumes: {upperSize: 1Gi}", "upperSize"},
	})
}
