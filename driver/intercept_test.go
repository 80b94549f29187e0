package driver

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/strata-csi/strata/driver/engine"
)

const tokensJSON = `{"registry.io":{"token":"eyJ-secret-token","expirationTimestamp":"2030-01-01T00:00:00Z"},"":{"token":"default-aud-token","expirationTimestamp":"2030-01-01T00:00:00Z"}}`

// TestSanitize: a logged publish request shows neither the secrets nor the
// pod's ServiceAccount tokens of its volume context, and the request itself
// is left as it was.
func TestSanitize(t *testing.T) {
	t.Parallel()
	req := &csi.NodePublishVolumeRequest{
		VolumeId: "v", TargetPath: "/t",
		Secrets:       map[string]string{".dockerconfigjson": "pull-secret-password"},
		VolumeContext: map[string]string{"image": "registry.io/a:v1", engine.AttrTokens: tokensJSON, "csi.storage.k8s.io/serviceAccount.name": "puller"},
	}
	got := sanitize(req).String()
	for _, leak := range []string{"eyJ-secret-token", "default-aud-token", "pull-secret-password"} {
		if strings.Contains(got, leak) {
			t.Errorf("logged request shows %q: %s", leak, got)
		}
	}
	if !strings.Contains(got, "registry.io/a:v1") || !strings.Contains(got, "puller") {
		t.Errorf("logged request lost the harmless fields: %s", got)
	}
	if req.VolumeContext[engine.AttrTokens] != tokensJSON {
		t.Error("sanitize changed the request")
	}
}
