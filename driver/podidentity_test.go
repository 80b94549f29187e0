package driver

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
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
		VolumeContext: map[string]string{"image": "registry.io/a:v1", attrTokens: tokensJSON, attrServiceAccount: "puller"},
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
	if req.VolumeContext[attrTokens] != tokensJSON {
		t.Error("sanitize changed the request")
	}
}

// TestIdentityOf: the pod, its account and its tokens by audience, from
// the volume context or (serviceAccountTokenInSecrets) the secrets, which
// then lose the key; a malformed value is InvalidArgument and not quoted.
func TestIdentityOf(t *testing.T) {
	t.Parallel()
	vctx := map[string]string{attrPodNamespace: "ns", attrPodName: "p", attrPodUID: "u", attrServiceAccount: "puller", attrTokens: tokensJSON}
	pod, secrets, err := identityOf(vctx, nil)
	if err != nil || pod.Namespace != "ns" || pod.ServiceAccount != "puller" || pod.Tokens["registry.io"] != "eyJ-secret-token" || pod.Tokens[""] != "default-aud-token" || secrets != nil {
		t.Errorf("identity %+v, secrets %v, err %v", pod, secrets, err)
	}
	in := map[string]string{attrTokens: tokensJSON, ".dockerconfigjson": "{}"}
	pod, secrets, err = identityOf(map[string]string{attrServiceAccount: "puller"}, in)
	if err != nil || pod.Tokens["registry.io"] != "eyJ-secret-token" || len(secrets) != 1 || len(in) != 2 {
		t.Errorf("from secrets: identity %+v, secrets %v (in %v), err %v", pod, secrets, in, err)
	}
	_, _, err = identityOf(map[string]string{attrTokens: `{"a": "eyJ-broken`}, nil)
	if err == nil || strings.Contains(err.Error(), "eyJ") || !strings.Contains(err.Error(), attrTokens) {
		t.Errorf("malformed tokens: %v", err)
	}
	if s := pod.String(); strings.Contains(s, "eyJ") {
		t.Errorf("Pod.String shows a token: %s", s)
	}
}
