package csitest

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// The private registry's only user.
const privUser, privPass = "robot", "s3cret"

// privateImage starts a registry that demands basic auth, pushes a
// one-file image to it and returns the registry's host:port and the image.
func privateImage(t *testing.T) (reg, ref string) {
	t.Helper()
	reg = testimage.Server(t, testimage.BasicAuth(privUser, privPass))
	ref = reg + "/private/data:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t,
		testimage.Tar(t, testimage.File("data.txt", "private\n")), testimage.Gzip)),
		remote.WithAuth(&authn.Basic{Username: privUser, Password: privPass}))
	return reg, ref
}

// pullSecret is the request's secrets of a volume whose node-publish secret
// is a kubernetes.io/dockerconfigjson secret for host.
func pullSecret(host, user, pass string) map[string]string {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	return map[string]string{".dockerconfigjson": fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, auth)}
}

// privReq is a publish request of ref with secrets.
func (e *env) privReq(volID, ref string, secrets map[string]string) *csi.NodePublishVolumeRequest {
	req := pubReq(volID, e.target(volID), map[string]string{"image": ref})
	req.Secrets = secrets
	return req
}

// TestNodePublishSecret: the volume's node-publish secret pulls a private
// image; a wrong one, or none, is PermissionDenied with a message that says
// where the refused credentials came from, or which sources had none.
func TestNodePublishSecret(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg, ref := privateImage(t)

	_, err := e.Node.NodePublishVolume(ctx(t), e.privReq("none", ref, nil))
	wantCode(t, err, codes.PermissionDenied, "registry refused access to "+ref, "no credentials for "+reg,
		"the volume has no nodePublishSecretRef", "no service account is configured", "no credential provider is configured")

	_, err = e.Node.NodePublishVolume(ctx(t), e.privReq("wrong", ref, pullSecret(reg, privUser, "guess")))
	wantCode(t, err, codes.PermissionDenied, ref, "it refused the credentials from the volume's node-publish secret")
	if strings.Contains(err.Error(), "guess") {
		t.Errorf("the error shows the password: %v", err)
	}

	_, err = e.Node.NodePublishVolume(ctx(t), e.privReq("other", ref, pullSecret("quay.io", privUser, privPass)))
	wantCode(t, err, codes.PermissionDenied, "the volume's node-publish secret has no entry for "+reg)

	req := e.privReq("right", ref, pullSecret(reg, privUser, privPass))
	e.publish(req)
	if got := readString(t, filepath.Join(req.TargetPath, "data.txt")); got != "private\n" {
		t.Errorf("data.txt = %q", got)
	}
	if err := e.unpublish("right", req.TargetPath); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
	if data, _ := os.ReadFile(e.LogPath); strings.Contains(string(data), privPass) {
		t.Error("the plugin logged the password")
	}
}

// providers is a bin dir of credential provider plugins and a kubelet
// CredentialProviderConfig for them.
type providers struct {
	t      *testing.T
	bin    string
	config strings.Builder
}

func newProviders(t *testing.T) *providers {
	p := &providers{t: t, bin: t.TempDir()}
	p.config.WriteString("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n")
	return p
}

// add installs a plugin whose shell body runs after it appends its request
// to <bin>/<name>.runs, and lists it for matchImages.
func (p *providers) add(name, body string, matchImages ...string) {
	runs := filepath.Join(p.bin, name+".runs")
	script := "#!/bin/sh\ncat >> " + runs + "\necho >> " + runs + "\n" + body
	if err := os.WriteFile(filepath.Join(p.bin, name), []byte(script), 0o755); err != nil {
		p.t.Fatal(err)
	}
	var quoted []string
	for _, m := range matchImages {
		quoted = append(quoted, fmt.Sprintf("%q", m)) // a bare * is a YAML alias
	}
	fmt.Fprintf(&p.config, "  - name: %s\n    matchImages: [%s]\n    defaultCacheDuration: 0s\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
		name, strings.Join(quoted, ", "))
}

// runs returns the requests the plugin name was run with.
func (p *providers) runs(name string) []string {
	data, err := os.ReadFile(filepath.Join(p.bin, name+".runs"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		p.t.Fatal(err)
	}
	return strings.Fields(string(data))
}

// args are the plugin's flags for these providers.
func (p *providers) args(more ...string) []string {
	cfg := filepath.Join(p.t.TempDir(), "credential-providers.yaml")
	if err := os.WriteFile(cfg, []byte(p.config.String()), 0o644); err != nil {
		p.t.Fatal(err)
	}
	return append([]string{"--image-credential-provider-config=" + cfg, "--image-credential-provider-bin-dir=" + p.bin}, more...)
}

// answer is a plugin body that answers with user:password for key.
func answer(key, user, pass string) string {
	return fmt.Sprintf(`echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","auth":{%q:{"username":%q,"password":%q}}}'`+"\n",
		key, user, pass)
}

// newEnvWith starts a node plugin with more flags.
func newEnvWith(t *testing.T, args []string) *env {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	return &env{t: t, dir: dir, root: root, Plugin: Start(t, Options{Bin: pluginBin, Root: root, Mode: "node", Args: args})}
}

// TestCredentialProvider: a kubelet credential provider exec plugin, run
// with kubelet's config file and protocol, pulls a private image for a
// volume without a secret; a provider whose matchImages do not match the
// image is never run; the node-publish secret comes first when both match.
func TestCredentialProvider(t *testing.T) {
	t.Parallel()
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.add("elsewhere", answer("*.example.com", "x", "y"), "*.example.com", "127.0.0.1")
	p.add("local", answer(reg, privUser, privPass), reg)
	e := newEnvWith(t, p.args())

	req := e.privReq("provided", ref, nil)
	e.publish(req)
	if got := readString(t, filepath.Join(req.TargetPath, "data.txt")); got != "private\n" {
		t.Errorf("data.txt = %q", got)
	}
	runs := p.runs("local")
	if len(runs) != 1 || !strings.Contains(runs[0], `"image":"`+reg+`/private/data"`) || !strings.Contains(runs[0], `"kind":"CredentialProviderRequest"`) {
		t.Errorf("the provider's requests: %q, want one CredentialProviderRequest for %s/private/data", runs, reg)
	}
	// Its matchImages are a different domain, and a host without the port.
	if r := p.runs("elsewhere"); len(r) != 0 {
		t.Errorf("the provider whose matchImages do not match %s ran: %q", ref, r)
	}

	// Both match: the node-publish secret is used, and the provider not run
	// (its credentials would have been accepted).
	_, err := e.Node.NodePublishVolume(ctx(t), e.privReq("secret-first", ref, pullSecret(reg, privUser, "guess")))
	wantCode(t, err, codes.PermissionDenied, "the volume's node-publish secret")
	if r := p.runs("local"); len(r) != 1 {
		t.Errorf("the provider ran %d times, want once: the secret comes first", len(r))
	}
	if err := e.unpublish("provided", req.TargetPath); err != nil {
		t.Fatal(err)
	}
}

// TestCredentialProviderRefused: credentials from a provider that the
// registry refuses are named by their provider.
func TestCredentialProviderRefused(t *testing.T) {
	t.Parallel()
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.add("stale", answer(reg, privUser, "expired"), reg)
	e := newEnvWith(t, p.args())
	_, err := e.Node.NodePublishVolume(ctx(t), e.privReq("stale", ref, nil))
	wantCode(t, err, codes.PermissionDenied, ref, "it refused the credentials from credential provider stale")
}

// TestCredentialProviderFails: a provider that fails or does not answer in
// time gives an error that names it and says what happened; the plugin
// kills a hung provider at --image-credential-provider-timeout.
func TestCredentialProviderFails(t *testing.T) {
	t.Parallel()
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.add("broken", "echo 'cannot reach the metadata service' >&2\nexit 1\n", reg)
	p.add("hung", "sleep 60\n", reg)
	e := newEnvWith(t, p.args("--image-credential-provider-timeout=1s"))
	_, err := e.Node.NodePublishVolume(ctx(t), e.privReq("fails", ref, nil))
	wantCode(t, err, codes.PermissionDenied, "no credentials for "+reg,
		"credential provider broken failed for "+reg+"/private/data: exit status 1: cannot reach the metadata service",
		"credential provider hung did not answer within 1s")
}
