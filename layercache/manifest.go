package layercache

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// blobKind tells a blob getter which registry endpoint serves a digest.
type blobKind int

const (
	manifestBlob blobKind = iota // a manifest or an index
	configBlob                   // an image config
)

// maxLayers bounds the layers of one image; overlayfs stacks at most 500
// lower directories, and a longer manifest is more likely hostile than real.
const maxLayers = 500

// manifestDoc is the union of the fields of OCI and Docker schema 2
// manifests and indexes that the store reads.
type manifestDoc struct {
	SchemaVersion int               `json:"schemaVersion"`
	MediaType     types.MediaType   `json:"mediaType"`
	ArtifactType  string            `json:"artifactType"`
	Config        *v1.Descriptor    `json:"config"`
	Layers        []v1.Descriptor   `json:"layers"`
	Manifests     []v1.Descriptor   `json:"manifests"`
	FSLayers      []json.RawMessage `json:"fsLayers"` // schema 1
}

// build assembles the Image that the manifest or index top describes,
// getting every manifest and config it needs through get.
//
// What a digest describes never changes, so the result is kept in memory:
// a publish of a cached image does not parse its manifest and config again.
func (s *Store) build(ref string, top v1.Hash, get func(v1.Hash, blobKind) ([]byte, error)) (*Image, error) {
	if c, ok := s.built.Load(top); ok {
		img := *c.(*Image)
		img.Ref = ref
		return &img, nil
	}
	img, err := s.buildUncached(ref, top, get)
	if err != nil {
		return nil, err
	}
	s.built.Store(top, img)
	cp := *img
	return &cp, nil
}

func (s *Store) buildUncached(ref string, top v1.Hash, get func(v1.Hash, blobKind) ([]byte, error)) (*Image, error) {
	data, err := get(top, manifestBlob)
	if err != nil {
		return nil, err
	}
	doc, err := parseManifest(ref, data)
	if err != nil {
		return nil, err
	}
	img := &Image{Ref: ref, Digest: top}
	if doc.Manifests != nil {
		child, err := s.pickPlatform(ref, doc.Manifests)
		if err != nil {
			return nil, err
		}
		idx := top
		img.IndexDigest = &idx
		img.Digest = child.Digest
		if data, err = get(child.Digest, manifestBlob); err != nil {
			return nil, err
		}
		if doc, err = parseManifest(ref, data); err != nil {
			return nil, err
		}
		if doc.Manifests != nil {
			return nil, fmt.Errorf("%w: %s: an index inside an index is not supported", ErrUnsupported, ref)
		}
	}
	kind, err := classifyManifest(doc)
	if err != nil {
		return nil, fmt.Errorf("%s: manifest %s: %w", ref, img.Digest, err)
	}
	if kind == kindArtifact {
		if err := buildArtifact(ref, img, doc); err != nil {
			return nil, err
		}
		return img, nil
	}
	if len(doc.Layers) > maxLayers {
		return nil, fmt.Errorf("%w: %s has %d layers; overlayfs stacks at most %d", ErrUnsupported, ref, len(doc.Layers), maxLayers)
	}
	if err := checkDigest(doc.Config.Digest); err != nil {
		return nil, err
	}
	cfgData, err := get(doc.Config.Digest, configBlob)
	if err != nil {
		return nil, err
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(cfgData))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: config %s: %v", ErrUnsupported, ref, doc.Config.Digest, err)
	}
	if len(cfg.RootFS.DiffIDs) != len(doc.Layers) {
		return nil, fmt.Errorf("%w: %s: config lists %d diffIDs for %d layers", ErrUnsupported, ref, len(cfg.RootFS.DiffIDs), len(doc.Layers))
	}
	for i, l := range doc.Layers {
		if err := checkDigest(l.Digest); err != nil {
			return nil, err
		}
		if err := checkDigest(cfg.RootFS.DiffIDs[i]); err != nil {
			return nil, err
		}
		img.Layers = append(img.Layers, Layer{DiffID: cfg.RootFS.DiffIDs[i], Digest: l.Digest, Size: l.Size, MediaType: l.MediaType})
	}
	return img, nil
}

// parseManifest decodes a manifest or index, refusing schema 1.
func parseManifest(ref string, data []byte) (*manifestDoc, error) {
	var doc manifestDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%w: %s: manifest is not valid JSON: %v", ErrUnsupported, ref, err)
	}
	if doc.SchemaVersion == 1 || doc.FSLayers != nil {
		return nil, fmt.Errorf("%w: %s uses Docker schema 1 manifests; push it again with a current client", ErrUnsupported, ref)
	}
	if doc.SchemaVersion != 2 {
		return nil, fmt.Errorf("%w: %s: manifest schemaVersion %d", ErrUnsupported, ref, doc.SchemaVersion)
	}
	return &doc, nil
}

// layerMediaType reports whether mt is an image layer (gzip, zstd or
// uncompressed tar, OCI or Docker, distributable or not).
func layerMediaType(mt types.MediaType) bool {
	switch mt {
	case types.DockerLayer, types.DockerForeignLayer, types.DockerUncompressedLayer,
		types.OCILayer, types.OCILayerZStd, types.OCIUncompressedLayer,
		types.OCIRestrictedLayer, types.OCIUncompressedRestrictedLayer:
		return true
	}
	return strings.HasPrefix(string(mt), "application/vnd.oci.image.layer.nondistributable.v1.tar")
}

// pickPlatform chooses the store's platform from an index, falling back to
// linux/amd64.
func (s *Store) pickPlatform(ref string, ms []v1.Descriptor) (v1.Descriptor, error) {
	want := []v1.Platform{s.opts.platform, {OS: "linux", Architecture: "amd64"}}
	for _, w := range want {
		for _, m := range ms {
			if m.Platform == nil || m.Platform.OS != w.OS || m.Platform.Architecture != w.Architecture {
				continue
			}
			if w.Variant != "" && m.Platform.Variant != "" && m.Platform.Variant != w.Variant {
				continue
			}
			if err := checkDigest(m.Digest); err != nil {
				return v1.Descriptor{}, err
			}
			return m, nil
		}
	}
	var have []string
	for _, m := range ms {
		if m.Platform != nil {
			have = append(have, m.Platform.String())
		}
	}
	return v1.Descriptor{}, fmt.Errorf("%w: %s has no manifest for %s (it has: %s)", ErrUnsupported, ref, s.opts.platform.String(), strings.Join(have, ", "))
}
