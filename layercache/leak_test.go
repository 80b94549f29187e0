package layercache

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/strata-csi/strata/test/testimage"
)

// TestRegistryErrorsDoNotEchoBodies: what a registry answers is not copied
// into the error Pull returns, which becomes the gRPC status message and a
// pod event that anyone in the namespace reads. A volume may name a
// node-local port (the plugin is on the host network), so the answer may be
// anything. Errors report the HTTP status and the registry's error codes,
// and a registry's message only when it is short.
func TestRegistryErrorsDoNotEchoBodies(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		mode     testimage.LeakMode
		sentinel error
		want     []string // in the error message
	}{
		{testimage.LeakPingText, nil, []string{"404"}},
		{testimage.LeakPingJSON, ErrUnauthorized, []string{"403", "DENIED"}},
		{testimage.LeakManifestText, ErrNotFound, []string{"404"}},
		{testimage.LeakManifestJSON, ErrNotFound, []string{"404", "MANIFEST_UNKNOWN", "manifest unknown", "NAME_UNKNOWN"}},
		{testimage.LeakToken, nil, []string{"token"}},
		{testimage.LeakBlob, nil, []string{"400"}},
	} {
		t.Run(string(tc.mode), func(t *testing.T) {
			t.Parallel()
			host := testimage.Server(t, testimage.Leaky(tc.mode))
			ref := host + "/leak/img:v1"
			if tc.mode == testimage.LeakBlob {
				testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "x")), testimage.Gzip)))
			}
			s := openStore(t, t.TempDir())
			_, err := s.Pull(context.Background(), ref, PullOptions{})
			if err == nil {
				t.Fatal("Pull succeeded against a registry that answers with errors")
			}
			msg := err.Error()
			t.Logf("error: %s", msg)
			if strings.Contains(msg, testimage.LeakSecret) || strings.Contains(msg, "xxxxxxxxxx") {
				t.Errorf("the error repeats what the registry answered:\n%s", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("the error does not say %q:\n%s", w, msg)
				}
			}
			if tc.sentinel != nil && !errors.Is(err, tc.sentinel) {
				t.Errorf("the error does not wrap %v:\n%s", tc.sentinel, msg)
			}
			if len(msg) > 600 {
				t.Errorf("the error is %d bytes long, want at most 600:\n%s", len(msg), msg)
			}
		})
	}
}
