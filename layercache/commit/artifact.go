package commit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"k8s.io/klog/v2"
)

// An artifact (a model, an ORAS push: layercache/artifact.go) is committed
// as a new version of itself: its manifest with the volume's writes
// appended as one more layer, a gzip tar that the store unpacks at the
// volume's root (whiteouts included), of the media type its kind uses for
// such a layer. Its config is kept byte for byte, except a ModelPack
// config's list of layer diffIDs (modelfs.diffIds), which gets the new
// layer's; the manifest's other fields (artifactType, annotations) stay.

// isImageConfig reports whether a config media type is an image's.
func isImageConfig(mt types.MediaType) bool {
	return mt == types.OCIConfigJSON || mt == types.DockerConfigJSON
}

// artifactLayerType is the media type of a committed layer in an artifact
// whose config has media type cfg.
func artifactLayerType(cfg types.MediaType) types.MediaType {
	switch {
	case strings.HasPrefix(string(cfg), "application/vnd.cncf.model."):
		return "application/vnd.cncf.model.weight.v1.tar+gzip"
	case strings.HasPrefix(string(cfg), "application/vnd.cnai.model."):
		return "application/vnd.cnai.model.weight.v1.tar+gzip"
	case strings.HasPrefix(string(cfg), "application/vnd.kitops.modelkit."):
		return "application/vnd.kitops.modelkit.model.v1.tar+gzip"
	}
	// Docker model-runner, ORAS and other artifacts: an image layer without
	// a path of its own, which the store unpacks at the root.
	return types.OCILayer
}

// artifactManifest is the part of a manifest that a commit rewrites; the
// rest is kept as it was.
type artifactManifest struct {
	fields map[string]json.RawMessage
	config v1.Descriptor
	layers []v1.Descriptor
}

func parseArtifactManifest(raw []byte) (*artifactManifest, error) {
	m := &artifactManifest{}
	if err := json.Unmarshal(raw, &m.fields); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(m.fields["config"], &m.config); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := json.Unmarshal(m.fields["layers"], &m.layers); err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	return m, nil
}

// pushArtifact commits layer over the artifact whose manifest is raw (of
// media type mt), at base, to target.
func pushArtifact(ctx context.Context, raw []byte, mt types.MediaType, base name.Digest, target name.Tag, layer v1.Layer,
	wrapErr func(error, string) error, baseOpts, targetOpts []remote.Option) (v1.Hash, error) {
	m, err := parseArtifactManifest(raw)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("base artifact %s: manifest: %w", base, err)
	}
	digest, err := layer.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	size, err := layer.Size()
	if err != nil {
		return v1.Hash{}, err
	}
	diffID, err := layer.DiffID()
	if err != nil {
		return v1.Hash{}, err
	}
	m.layers = append(m.layers, v1.Descriptor{MediaType: artifactLayerType(m.config.MediaType), Digest: digest, Size: size,
		Annotations: map[string]string{"org.opencontainers.image.created": time.Now().UTC().Format(time.RFC3339)}})

	// The base's blobs go to the target repository first (mounted from the
	// base's repository on one registry, copied otherwise).
	for _, d := range append([]v1.Descriptor{m.config}, m.layers[:len(m.layers)-1]...) {
		bl, err := remote.Layer(base.Context().Digest(d.Digest.String()), baseOpts...)
		if err != nil {
			return v1.Hash{}, wrapErr(err, "read blob "+d.Digest.String()+" of "+base.String())
		}
		if err := remote.WriteLayer(target.Context(), bl, targetOpts...); err != nil {
			return v1.Hash{}, wrapErr(err, "push blob "+d.Digest.String()+" to "+target.String())
		}
	}
	if err := remote.WriteLayer(target.Context(), layer, targetOpts...); err != nil {
		return v1.Hash{}, wrapErr(err, "push the new layer to "+target.String())
	}
	if cfg, err := modelConfig(m.config, base, baseOpts, diffID, wrapErr); err != nil {
		return v1.Hash{}, err
	} else if cfg != nil {
		if err := remote.WriteLayer(target.Context(), cfg, targetOpts...); err != nil {
			return v1.Hash{}, wrapErr(err, "push the new config to "+target.String())
		}
		if m.config.Digest, err = cfg.Digest(); err != nil {
			return v1.Hash{}, err
		}
		if m.config.Size, err = cfg.Size(); err != nil {
			return v1.Hash{}, err
		}
	}
	if m.fields["config"], err = json.Marshal(m.config); err != nil {
		return v1.Hash{}, err
	}
	if m.fields["layers"], err = json.Marshal(m.layers); err != nil {
		return v1.Hash{}, err
	}
	out, err := json.Marshal(m.fields)
	if err != nil {
		return v1.Hash{}, err
	}
	sum, _, err := v1.SHA256(bytes.NewReader(out))
	if err != nil {
		return v1.Hash{}, err
	}
	klog.FromContext(ctx).V(2).Info("Pushing committed artifact", "image", target.String(), "base", base.String(), "digest", sum)
	if err := remote.Put(target, rawManifest{data: out, mediaType: mt}, targetOpts...); err != nil {
		return v1.Hash{}, wrapErr(err, "push "+target.String())
	}
	return sum, nil
}

// modelConfig returns the base's ModelPack config with diffID appended to
// its modelfs.diffIds, as a blob to push; nil for any other config, which
// is kept as it is.
func modelConfig(d v1.Descriptor, base name.Digest, baseOpts []remote.Option, diffID v1.Hash, wrapErr func(error, string) error) (v1.Layer, error) {
	if !strings.HasPrefix(string(d.MediaType), "application/vnd.cncf.model.config.") &&
		!strings.HasPrefix(string(d.MediaType), "application/vnd.cnai.model.config.") {
		return nil, nil
	}
	bl, err := remote.Layer(base.Context().Digest(d.Digest.String()), baseOpts...)
	if err != nil {
		return nil, wrapErr(err, "read the config of "+base.String())
	}
	rc, err := bl.Compressed()
	if err != nil {
		return nil, wrapErr(err, "read the config of "+base.String())
	}
	defer rc.Close()
	var cfg map[string]json.RawMessage
	if err := json.NewDecoder(rc).Decode(&cfg); err != nil {
		return nil, fmt.Errorf("base artifact %s: config: %w", base, err)
	}
	var fs map[string]json.RawMessage
	if raw, ok := cfg["modelfs"]; !ok || json.Unmarshal(raw, &fs) != nil {
		return nil, nil // no list of diffIDs to extend
	}
	var ids []string
	if raw, ok := fs["diffIds"]; ok {
		if err := json.Unmarshal(raw, &ids); err != nil {
			return nil, fmt.Errorf("base artifact %s: config modelfs.diffIds: %w", base, err)
		}
	}
	ids = append(ids, diffID.String())
	if fs["diffIds"], err = json.Marshal(ids); err != nil {
		return nil, err
	}
	if cfg["modelfs"], err = json.Marshal(fs); err != nil {
		return nil, err
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	return static.NewLayer(out, d.MediaType), nil
}

// rawManifest is a manifest to push as it is.
type rawManifest struct {
	data      []byte
	mediaType types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.data, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mediaType, nil }
