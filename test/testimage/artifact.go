package testimage

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Media types of OCI artifacts, as the tools that write them use them.
const (
	EmptyConfig    = "application/vnd.oci.empty.v1+json"
	ModelConfig    = "application/vnd.cncf.model.config.v1+json"
	ModelManifest  = "application/vnd.cncf.model.manifest.v1+json"
	ModelKitConfig = "application/vnd.kitops.modelkit.config.v1+json"
	DockerAIConfig = "application/vnd.docker.ai.model.config.v0.1+json"
	ORASUnknown    = "application/vnd.unknown.artifact.v1"

	ModelFilepath = "org.cncf.model.filepath"
	Title         = "org.opencontainers.image.title"
	ORASUnpack    = "io.deis.oras.content.unpack"
)

// Blob is one layer of an artifact: its bytes as stored in the registry.
type Blob struct {
	MediaType   string
	Data        []byte
	Annotations map[string]string
}

// Artifact is an OCI artifact manifest to push: an artifactType (may be
// empty), a config of ConfigMediaType (Config defaults to "{}") and layers.
type Artifact struct {
	ArtifactType    string
	ConfigMediaType string
	Config          []byte
	Layers          []Blob
}

// Compress compresses a tar stream as a layer blob.
func Compress(t testing.TB, tarBytes []byte, c Compression) []byte {
	t.Helper()
	if c == None {
		return tarBytes
	}
	rc, err := Layer(t, tarBytes, c).Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// PushArtifact uploads a's blobs and manifest to ref and returns the
// manifest's digest.
func PushArtifact(t testing.TB, ref string, a Artifact, opts ...remote.Option) v1.Hash {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	cfg := a.Config
	if cfg == nil {
		cfg = []byte("{}")
	}
	desc := func(data []byte, mt string, ann map[string]string) map[string]any {
		sum := sha256.Sum256(data)
		d := map[string]any{"mediaType": mt, "digest": "sha256:" + hex.EncodeToString(sum[:]), "size": len(data)}
		if len(ann) > 0 {
			d["annotations"] = ann
		}
		if err := remote.WriteLayer(r.Context(), static.NewLayer(data, types.MediaType(mt)), opts...); err != nil {
			t.Fatalf("push blob to %s: %v", ref, err)
		}
		return d
	}
	m := map[string]any{
		"schemaVersion": 2,
		"mediaType":     string(types.OCIManifestSchema1),
		"config":        desc(cfg, a.ConfigMediaType, nil),
	}
	if a.ArtifactType != "" {
		m["artifactType"] = a.ArtifactType
	}
	layers := []map[string]any{}
	for _, l := range a.Layers {
		layers = append(layers, desc(l.Data, l.MediaType, l.Annotations))
	}
	m["layers"] = layers
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Put(r, rawManifest(raw), opts...); err != nil {
		t.Fatalf("push manifest %s: %v", ref, err)
	}
	sum := sha256.Sum256(raw)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

type rawManifest []byte

func (m rawManifest) RawManifest() ([]byte, error) { return m, nil }
