package layercache

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	ti "github.com/strata-csi/strata/test/testimage"
)

func TestHostileArtifactPaths(t *testing.T) {
	for name, tc := range map[string]struct {
		layers []ti.Blob
		want   error
	}{
		"dotdot":    {[]ti.Blob{raw("text/plain", "x", ti.Title, "../x")}, ErrUnsafeLayer},
		"nested":    {[]ti.Blob{raw("text/plain", "x", ti.ModelFilepath, "a/../../x")}, ErrUnsafeLayer},
		"absolute":  {[]ti.Blob{raw("text/plain", "x", ti.ModelFilepath, "/etc/x")}, ErrUnsafeLayer},
		"nul":       {[]ti.Blob{raw("text/plain", "x", ti.Title, "a\x00b")}, ErrUnsafeLayer},
		"long":      {[]ti.Blob{raw("text/plain", "x", ti.Title, strings.Repeat("d/", 2500))}, ErrUnsafeLayer},
		"component": {[]ti.Blob{raw("text/plain", "x", ti.Title, strings.Repeat("c", 300))}, ErrUnsafeLayer},
		"two at one path": {[]ti.Blob{raw("text/plain", "x", ti.Title, "same"), raw("text/plain", "y", ti.ModelFilepath, "same")},
			ErrUnsupported},
		"file over dir": {[]ti.Blob{raw("text/plain", "x", ti.Title, "a"), raw("text/plain", "y", ti.Title, "a/b")}, ErrUnsupported},
		"tar escapes": {[]ti.Blob{raw("text/plain", "ok", ti.Title, "ok.txt"),
			tarBlob(t, "application/vnd.kitops.modelkit.model.v1.tar", ti.None, ti.File("../escape", "x"))}, ErrUnsafeLayer},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			sp := newSpy()
			ref := ti.Server(t, sp.wrap) + "/evil:v1"
			ti.PushArtifact(t, ref, ti.Artifact{ConfigMediaType: ti.EmptyConfig, Layers: tc.layers})
			root := t.TempDir()
			s := openStore(t, root)
			_, err := s.Pull(context.Background(), ref, PullOptions{})
			if !errors.Is(err, tc.want) {
				t.Fatalf("want %v, got %v", tc.want, err)
			}
			t.Logf("refused: %v", err)
			// A path annotation is refused before anything is fetched. A tar
			// entry that escapes is the unpacker's: that layer is not kept
			// (as an image's), nor any tree; a sibling file that verified
			// may stay, as an image's sibling layer does.
			ls, lerr := s.Layers()
			if lerr != nil {
				t.Fatal(lerr)
			}
			for _, l := range ls {
				if name != "tar escapes" || l.Kind != kindRaw {
					t.Errorf("entry kept: %s (%s)", l.DiffID, l.Kind)
				}
			}
			if name != "tar escapes" {
				if n := len(dirEntries(t, filepath.Join(root, layersDir))); n != 0 {
					t.Errorf("%d entries under layers/", n)
				}
				sp.mu.Lock()
				defer sp.mu.Unlock()
				if len(sp.blobs) != 0 {
					t.Errorf("blobs fetched before the refusal: %v", sp.blobs)
				}
			}
		})
	}
}

func TestNonFileArtifactsRefused(t *testing.T) {
	reg := ti.Registry(t)
	s := openStore(t, t.TempDir())
	for name, tc := range map[string]struct {
		a    ti.Artifact
		want []string
	}{
		"helm": {ti.Artifact{ConfigMediaType: "application/vnd.cncf.helm.config.v1+json", Layers: []ti.Blob{
			raw("application/vnd.cncf.helm.chart.content.v1.tar+gzip", "chart")}},
			[]string{"Helm chart", "application/vnd.cncf.helm.config.v1+json", "application/vnd.cncf.helm.chart.content.v1.tar+gzip"}},
		"cosign": {ti.Artifact{ConfigMediaType: string(types.OCIConfigJSON), Layers: []ti.Blob{
			raw("application/vnd.dev.cosign.simplesigning.v1+json", "{}")}},
			[]string{"cosign signature", "application/vnd.dev.cosign.simplesigning.v1+json"}},
		"sbom": {ti.Artifact{ArtifactType: "application/spdx+json", ConfigMediaType: ti.EmptyConfig, Layers: []ti.Blob{
			raw("application/spdx+json", "{}")}},
			[]string{"SPDX SBOM", "artifactType application/spdx+json"}},
	} {
		ref := reg + "/" + name + ":v1"
		ti.PushArtifact(t, ref, tc.a)
		_, err := s.Pull(context.Background(), ref, PullOptions{})
		if !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: want ErrUnsupported, got %v", name, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not name %q", name, err, w)
			}
		}
	}
}

// An artifact's files are content like layers: a registry that names a
// cached private model's digests (here: its very manifest, pushed without
// its blobs to a registry that claims to hold every blob) gets neither its
// tree nor its files.
func TestHostileRegistryCannotClaimCachedPrivateModel(t *testing.T) {
	s := openStore(t, t.TempDir())
	auth := ti.BasicAuth("bob", "hunter2")
	reg := ti.Server(t, auth)
	model := modelPack(t, "private-shard")
	ti.PushArtifact(t, reg+"/team-b/model:v1", model, remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	bob := basicFor(reg, "bob", "hunter2")
	ctx := context.Background()
	if _, err := s.Pull(ctx, reg+"/team-b/model:v1", PullOptions{Keychain: bob}); err != nil {
		t.Fatalf("tenant B pulls its private model: %v", err)
	}
	liar := ti.Server(t, ti.Liar)
	d := ti.PushArtifact(t, liar+"/x/model:v1", model)
	for _, ref := range []string{liar + "/x/model:v1", liar + "/x/model@" + d.String()} {
		img, err := s.Pull(ctx, ref, PullOptions{})
		if err == nil {
			t.Fatalf("Pull(%s) = %v, nil: B's private model served to a registry that never proved it holds it", ref, img.DiffIDs())
		}
		if !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("Pull(%s) = %v, want ErrUnauthorized", ref, err)
		}
		t.Logf("refused: %v", err)
	}
	if _, err := s.Pull(ctx, reg+"/team-b/model:v1", PullOptions{Keychain: bob, Policy: PullNever}); err != nil {
		t.Fatalf("tenant B, its own secret, Never: %v", err)
	}
}

// No blob produces an artifact's tree: an image config that names the
// tree's key as a diffID (the key is public: paths and digests) gets
// nothing, even with the credential check off.
func TestImageCannotNameATree(t *testing.T) {
	s := openStore(t, t.TempDir(), WithoutCredentialCheck())
	reg := ti.Server(t, ti.BasicAuth("bob", "hunter2"))
	ti.PushArtifact(t, reg+"/team-b/model:v1", modelPack(t, "private-shard"), remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	img, err := s.Pull(context.Background(), reg+"/team-b/model:v1", PullOptions{Keychain: basicFor(reg, "bob", "hunter2")})
	if err != nil {
		t.Fatal(err)
	}
	tree := img.Layers[len(img.Layers)-1].DiffID
	// An image whose config lists the tree's key as its diffID, and whose
	// layer names it as its blob digest, which no blob has.
	other := ti.Registry(t) + "/x/forged:v1"
	r, err := name.ParseReference(other)
	if err != nil {
		t.Fatal(err)
	}
	cfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["` + tree.String() + `"]}}`)
	if err := remote.WriteLayer(r.Context(), static.NewLayer(cfg, types.OCIConfigJSON)); err != nil {
		t.Fatal(err)
	}
	m := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":%q,"digest":"sha256:%s","size":%d},`+
		`"layers":[{"mediaType":%q,"digest":%q,"size":1}]}`, types.OCIManifestSchema1, types.OCIConfigJSON, sha(string(cfg)), len(cfg), types.OCILayer, tree)
	if err := remote.Put(r, rawJSON(m)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Pull(context.Background(), other, PullOptions{}); err == nil {
		t.Fatalf("an image naming the tree's key got it: %v", got.DiffIDs())
	} else {
		t.Logf("tree %s refused: %v", tree, err)
	}
}

type rawJSON string

func (m rawJSON) RawManifest() ([]byte, error) { return []byte(m), nil }
