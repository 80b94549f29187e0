package engine

import (
	"strings"
	"testing"
)

// TestParseUpperSize: sizes are Kubernetes quantities of at least 1Mi and
// at most what an image can hold.
func TestParseUpperSize(t *testing.T) {
	for in, want := range map[string]int64{
		"1Mi": 1 << 20, "16Mi": 16 << 20, "1Gi": 1 << 30, " 10Gi ": 10 << 30, "1.5Gi": 3 << 29,
		"1G": 1e9, "2000000": 2e6, "1e9": 1e9, "95Ti": 95 << 40,
	} {
		if got, err := ParseUpperSize(in); err != nil || got != want {
			t.Errorf("ParseUpperSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for in, word := range map[string]string{
		"": "quantity", "lots": "quantity", "0": "quantity", "-1Gi": "quantity", "10Zi": "quantity", "5GB": "quantity",
		"1Ki": "at least 1Mi", "1048575": "at least 1Mi", "100Ti": "95 TiB", "8Ei": "95 TiB",
	} {
		if got, err := ParseUpperSize(in); err == nil || !strings.Contains(err.Error(), word) {
			t.Errorf("ParseUpperSize(%q) = %d, %v; want an error about %q", in, got, err, word)
		}
	}
}
