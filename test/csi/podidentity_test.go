package csitest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// The audience of the token provider of these tests, and the tokens that
// it accepts (kubelet would mint them for the pods' ServiceAccounts).
const (
	tokenAudience = "registry.example/strata"
	podTokenOne   = "eyJhbGciOiJSUzI1NiJ9.pod-token-one.sig"
	podTokenTwo   = "eyJhbGciOiJSUzI1NiJ9.pod-token-two.sig"
)

// addTokenProvider installs a credential provider with tokenAttributes
// (audience tokenAudience, cacheType Token, answers cached for ten
// minutes) that logs each request to <bin>/<name>.runs and answers with
// user:pass for reg only when the request carries one of the accepted
// tokens, as a registry's token exchange would.
func (p *providers) addTokenProvider(name, reg, user, pass string, require bool, accepted ...string) {
	runs := filepath.Join(p.bin, name+".runs")
	var cases []string
	for _, tok := range accepted {
		cases = append(cases, fmt.Sprintf(`*'"serviceAccountToken":"%s"'*`, tok))
	}
	script := "#!/bin/sh\nreq=$(cat)\nprintf '%s\\n' \"$req\" >> " + runs + "\ncase \"$req\" in\n" +
		strings.Join(cases, "|") + ")\n  " + answer(reg, user, pass) + "  ;;\n" +
		"*) echo '{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Registry\",\"auth\":{}}' ;;\nesac\n"
	if err := os.WriteFile(filepath.Join(p.bin, name), []byte(script), 0o755); err != nil {
		p.t.Fatal(err)
	}
	fmt.Fprintf(&p.config, `  - name: %s
    matchImages: [%q]
    defaultCacheDuration: 10m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    tokenAttributes:
      serviceAccountTokenAudience: %s
      cacheType: Token
      requireServiceAccount: %v
`, name, reg, tokenAudience, require)
}

// tokenRuns returns the serviceAccountToken of each request the provider
// was run with ("" for none).
func (p *providers) tokenRuns(name string) []string {
	var out []string
	for _, line := range p.runs(name) {
		var req struct {
			ServiceAccountToken string `json:"serviceAccountToken"`
		}
		if err := json.Unmarshal([]byte(line), &req); err != nil {
			p.t.Fatalf("provider request %q: %v", line, err)
		}
		out = append(out, req.ServiceAccountToken)
	}
	return out
}

// podPublish is a publish request as kubelet makes it for a pod with
// podInfoOnMount and, if token is set, tokenRequests for tokenAudience.
func (e *env) podPublish(volID, ref, token string) *csi.NodePublishVolumeRequest {
	e.t.Helper()
	attrs := map[string]string{
		"image":                                  ref,
		"csi.storage.k8s.io/pod.name":            "pod-" + volID,
		"csi.storage.k8s.io/pod.namespace":       "team-a",
		"csi.storage.k8s.io/pod.uid":             "uid-" + volID,
		"csi.storage.k8s.io/serviceAccount.name": "puller",
		"csi.storage.k8s.io/ephemeral":           "true",
	}
	if token != "" {
		tokens, err := json.Marshal(map[string]map[string]string{tokenAudience: {
			"token": token, "expirationTimestamp": time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
		}})
		if err != nil {
			e.t.Fatal(err)
		}
		attrs["csi.storage.k8s.io/serviceAccount.tokens"] = string(tokens)
	}
	return pubReq(volID, e.target(volID), attrs)
}

// TestPodIdentityTokenProvider: with --pod-identity, a credential provider
// with tokenAttributes is given the pod's ServiceAccount token for its
// audience from the volume context, and its credentials pull a private
// image. Without the token, the publish fails naming the audience and the
// chart value to set. Two pods with different tokens never share a cached
// answer (the provider sees both tokens), while the same token is served
// from the cache. No token ever reaches the plugin's log.
func TestPodIdentityTokenProvider(t *testing.T) {
	t.Parallel()
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.addTokenProvider("token-exchange", reg, privUser, privPass, true, podTokenOne, podTokenTwo)
	e := newEnvWith(t, p.args("--pod-identity"))

	one := e.podPublish("one", ref, podTokenOne)
	e.publish(one)
	if got := readString(t, filepath.Join(one.TargetPath, "data.txt")); got != "private\n" {
		t.Errorf("data.txt = %q", got)
	}
	if runs := p.tokenRuns("token-exchange"); len(runs) != 1 || runs[0] != podTokenOne {
		t.Fatalf("the provider was run with tokens %q, want the pod's one token", runs)
	}

	_, err := e.Node.NodePublishVolume(ctx(t), e.podPublish("no-token", ref, ""))
	wantCode(t, err, codes.PermissionDenied, ref, "credential provider token-exchange needs the pod's service account token",
		fmt.Sprintf("audience %q", tokenAudience), "podIdentity.audiences")

	two := e.podPublish("two", ref, podTokenTwo)
	e.publish(two)
	again := e.podPublish("again", ref, podTokenOne)
	e.publish(again)
	if runs := p.tokenRuns("token-exchange"); len(runs) != 2 || runs[0] != podTokenOne || runs[1] != podTokenTwo {
		t.Errorf("the provider was run with tokens %q, want the first pod's, then the second's (its own run, not the first's cached answer), "+
			"and no run for the first token again (cached)", runs)
	}
	_, err = e.Node.NodePublishVolume(ctx(t), e.podPublish("stranger", ref, "eyJ.not-a-token-the-registry-knows.sig"))
	wantCode(t, err, codes.PermissionDenied, ref, "credential provider token-exchange returned no credentials for it")

	for _, req := range []*csi.NodePublishVolumeRequest{one, two, again} {
		if err := e.unpublish(req.VolumeId, req.TargetPath); err != nil {
			t.Fatal(err)
		}
	}
	log, err := os.ReadFile(e.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "csi.storage.k8s.io/serviceAccount.tokens") {
		t.Error("the log has no publish request at all: the test proves nothing (the plugin runs with --v=4)")
	}
	for _, tok := range []string{podTokenOne, podTokenTwo, "not-a-token-the-registry-knows"} {
		if strings.Contains(string(log), tok) {
			t.Errorf("the plugin logged the service account token %q", tok)
		}
	}
}

// TestPodIdentityOptionalToken: a token provider with
// requireServiceAccount: false is run without a token when the volume
// context has none, as kubelet runs it for a pod without a service
// account.
func TestPodIdentityOptionalToken(t *testing.T) {
	t.Parallel()
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.addTokenProvider("lenient", reg, privUser, privPass, false, podTokenOne)
	e := newEnvWith(t, p.args("--pod-identity"))
	_, err := e.Node.NodePublishVolume(ctx(t), e.podPublish("no-token", ref, ""))
	wantCode(t, err, codes.PermissionDenied, "credential provider lenient returned no credentials for it")
	if runs := p.tokenRuns("lenient"); len(runs) != 1 || runs[0] != "" {
		t.Errorf("the provider was run with tokens %q, want one run without a token", runs)
	}
}

// TestPrepullWithCredentials: a prepull uses the chain too (no volume
// secret, no pod): a plain credential provider's credentials pull a
// private image at start.
func TestPrepullWithCredentials(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	reg, ref := privateImage(t)
	p := newProviders(t)
	p.add("local", answer(reg, privUser, privPass), reg)
	root := filepath.Join(t.TempDir(), "root")
	Start(t, Options{Bin: pluginBin, Root: root, Mode: "node", Args: p.args("--prepull=" + ref)})
	deadline := time.Now().Add(30 * time.Second)
	for !owners(t, root)["prepull:"+ref] {
		if time.Now().After(deadline) {
			t.Fatalf("the private image was not prepulled within 30s; owners: %v", owners(t, root))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if runs := p.runs("local"); len(runs) != 1 {
		t.Errorf("the provider ran %d times, want once", len(runs))
	}
}

// TestLayerRefusalExplained: a registry that serves the manifest to anyone
// but a layer only with credentials refuses during the fetch of the layers,
// not the resolve; the error says what the chain tried all the same.
func TestLayerRefusalExplained(t *testing.T) {
	t.Parallel()
	layer := testimage.Layer(t, testimage.Tar(t, testimage.File("data.txt", "private\n")), testimage.Gzip)
	d, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	guarded := func(next http.Handler) http.Handler {
		auth := testimage.BasicAuth(privUser, privPass)(next)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
				auth.ServeHTTP(w, r)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	reg := testimage.Server(t, guarded)
	ref := reg + "/private/layers:v1"
	testimage.Push(t, ref, testimage.Image(t, layer), remote.WithAuth(&authn.Basic{Username: privUser, Password: privPass}))
	e := newEnv(t)
	_, err = e.Node.NodePublishVolume(ctx(t), e.privReq("layer", ref, nil))
	wantCode(t, err, codes.PermissionDenied, "registry refused access to "+ref, "no credentials for "+reg, "the volume has no nodePublishSecretRef")
	t.Logf("refused during the layer fetch: %v", err)
}
