package layercache

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// An OCI artifact (an ORAS push, a CNCF ModelPack model, a KitOps ModelKit, a
// Docker model-runner model) becomes a directory tree: each tar layer is
// unpacked at the volume's root by the image unpacker, and each other
// ("raw") layer is one file at its annotated path. What the tools write, as
// relied on here:
//
//   - ModelPack (github.com/modelpack/model-spec specs-go/v1/mediatype.go and
//     annotations.go, vendored by cri-o): config
//     application/vnd.cncf.model.config.v1+json, artifactType
//     application/vnd.cncf.model.manifest.v1+json, layers
//     application/vnd.cncf.model.{weight,weight.config,doc,code,dataset}.v1.{raw,tar,tar+gzip,tar+zstd},
//     each annotated org.cncf.model.filepath; modctl puts that path in the
//     entries of a tar layer. The older CNAI names are
//     application/vnd.cnai.model.* and org.cnai.model.filepath.
//   - KitOps (jozu-ai/kitops docs): config
//     application/vnd.kitops.modelkit.config.v1+json, layers
//     application/vnd.kitops.modelkit.{model,modelpart,dataset,code,docs,prompts}.v1.tar[+gzip|+zstd],
//     whose entries carry their path relative to the Kitfile's directory.
//   - ORAS (oras-go content/file): a pushed file is one layer whose blob is
//     the file, named by org.opencontainers.image.title, with the media type
//     application/vnd.oci.image.layer.v1.tar unless told otherwise; a pushed
//     directory is a tar+gzip layer annotated io.deis.oras.content.unpack=true
//     whose entries start with the directory's name. The config is
//     application/vnd.oci.empty.v1+json (oras 1.x) or
//     application/vnd.unknown.config.v1+json (oras 0.x).
//   - Docker model-runner (docker/model-runner cmd/cli/docs/reference/model_package.md):
//     config application/vnd.docker.ai.model.config.v0.1+json, one layer per
//     file (application/vnd.docker.ai.gguf.v3, ...safetensors, ...license)
//     with a filepath annotation.

// Annotations naming a raw layer's path, in order of preference.
var pathAnnotations = []string{"org.cncf.model.filepath", "org.cnai.model.filepath", "org.opencontainers.image.title"}

// orasUnpack marks an ORAS layer that is a tar (gzip) of a directory.
const orasUnpack = "io.deis.oras.content.unpack"

// Media types of the store's own artifact entries (meta.json Kind).
const (
	kindArtifactTar = "artifact-tar"
	kindRaw         = "raw"
	kindTree        = "tree"
)

// maxArtifactLayers bounds the layers of one artifact. Its raw files become
// one overlay lower, so the bound is not overlayfs's; it keeps a hostile
// manifest from making the node create millions of entries.
const maxArtifactLayers = 1 << 16

// Bounds of an annotated path, as the unpacker's for tar entry names.
const (
	maxPathBytes      = 4096
	maxComponentBytes = 255
)

// layerKind says how the store keeps a layer.
type layerKind uint8

const (
	imageLayer   layerKind = iota // an image layer: keyed by diffID, unpacked
	artifactTar                   // an artifact's tar layer: unpacked at the root, keyed by entryKey(blob)
	artifactRaw                   // an artifact's raw file: kept whole, keyed by entryKey(blob); not a lower
	artifactTree                  // the hardlinks of an artifact's raw files at their paths: one lower
)

// RawFile is one raw layer of an artifact: a file at Path.
type RawFile struct {
	Path  string
	Layer Layer
}

// manifestKind is what classifyManifest makes of a manifest.
type manifestKind int

const (
	kindImage manifestKind = iota
	kindArtifact
)

// refusedTypes are artifacts that are no file tree: a media type (config,
// artifactType or layer) with one of these prefixes refuses the manifest.
var refusedTypes = []struct{ prefix, what string }{
	{"application/vnd.cncf.helm.", "a Helm chart"},
	{"application/vnd.dev.cosign.", "a cosign signature or attestation"},
	{"application/vnd.dev.sigstore.", "a Sigstore bundle"},
	{"application/vnd.cncf.notary.", "a Notary signature"},
	{"application/jose+json", "a Notary signature"},
	{"application/cose", "a Notary signature"},
	{"application/vnd.in-toto", "an in-toto attestation"},
	{"application/vnd.dsse.", "an in-toto attestation"},
	{"application/spdx", "an SPDX SBOM"},
	{"text/spdx", "an SPDX SBOM"},
	{"application/vnd.cyclonedx", "a CycloneDX SBOM"},
	{"application/vnd.syft", "a Syft SBOM"},
}

// artifactConfig reports whether a config media type is that of an artifact
// whose layers are files.
func artifactConfig(mt types.MediaType) bool {
	switch mt {
	case "application/vnd.cncf.model.config.v1+json",
		"application/vnd.kitops.modelkit.config.v1+json",
		"application/vnd.oci.empty.v1+json",
		"application/vnd.unknown.config.v1+json":
		return true
	}
	for _, p := range []string{"application/vnd.cnai.model.config.", "application/vnd.docker.ai.model.config."} {
		if strings.HasPrefix(string(mt), p) {
			return true
		}
	}
	return false
}

// classifyManifest tells an image from an artifact whose layers are files,
// and refuses everything else, naming the artifactType, the config media
// type and the layer media types.
func classifyManifest(doc *manifestDoc) (manifestKind, error) {
	var cfg types.MediaType
	if doc.Config != nil {
		cfg = doc.Config.MediaType
	}
	all := []string{doc.ArtifactType, string(cfg)}
	for _, l := range doc.Layers {
		all = append(all, string(l.MediaType))
	}
	for _, t := range all {
		for _, r := range refusedTypes {
			if t != "" && strings.HasPrefix(t, r.prefix) {
				return 0, fmt.Errorf("%w: it is %s, not a file tree (%s)", ErrUnsupported, r.what, describeTypes(doc))
			}
		}
	}
	switch {
	case doc.Config == nil:
		return 0, fmt.Errorf("%w: a manifest without a config (%s)", ErrUnsupported, describeTypes(doc))
	case cfg == types.OCIConfigJSON || cfg == types.DockerConfigJSON:
		for i, l := range doc.Layers {
			if !layerMediaType(l.MediaType) {
				return 0, fmt.Errorf("%w: layer %d has media type %q, not an image layer (%s)", ErrUnsupported, i, l.MediaType, describeTypes(doc))
			}
		}
		return kindImage, nil
	case artifactConfig(cfg):
		if len(doc.Layers) == 0 {
			return 0, fmt.Errorf("%w: an artifact without layers has no files to mount (%s)", ErrUnsupported, describeTypes(doc))
		}
		return kindArtifact, nil
	}
	return 0, fmt.Errorf("%w: not an image nor an artifact of files that Strata knows (%s)", ErrUnsupported, describeTypes(doc))
}

// describeTypes names a manifest's artifactType, config and layer media
// types for an error message.
func describeTypes(doc *manifestDoc) string {
	at := doc.ArtifactType
	if at == "" {
		at = "none"
	}
	cfg := "none"
	if doc.Config != nil {
		cfg = string(doc.Config.MediaType)
	}
	var ls []string
	seen := map[types.MediaType]bool{}
	for _, l := range doc.Layers {
		if !seen[l.MediaType] {
			seen[l.MediaType] = true
			ls = append(ls, string(l.MediaType))
		}
	}
	return fmt.Sprintf("artifactType %s, config %s, layers [%s]", at, cfg, strings.Join(ls, ", "))
}

// tarArtifactLayer reports whether an artifact's layer is a tar to unpack:
// a model or ModelKit layer whose media type ends in a tar suffix, an ORAS
// layer marked for unpacking, or an image layer without a path of its own.
// ORAS gives a pushed file the media type of an uncompressed image layer:
// with a title and no unpack mark, it is a file.
func tarArtifactLayer(l v1.Descriptor) bool {
	if l.Annotations[orasUnpack] == "true" {
		return true
	}
	mt := string(l.MediaType)
	for _, p := range []string{"application/vnd.cncf.model.", "application/vnd.cnai.model.", "application/vnd.kitops.modelkit."} {
		if strings.HasPrefix(mt, p) {
			return strings.HasSuffix(mt, ".tar") || strings.HasSuffix(mt, ".tar+gzip") || strings.HasSuffix(mt, ".tar+zstd")
		}
	}
	return layerMediaType(l.MediaType) && rawPathAnnotation(l) == ""
}

// rawPathAnnotation returns the first path annotation a layer has.
func rawPathAnnotation(l v1.Descriptor) string {
	for _, a := range pathAnnotations {
		if p, ok := l.Annotations[a]; ok {
			return p
		}
	}
	return ""
}

// checkArtifactPath confines a raw file's path as the unpacker confines a
// tar entry name, and returns it cleaned.
func checkArtifactPath(p string) (string, error) {
	switch {
	case p == "":
		return "", fmt.Errorf("an empty path")
	case strings.ContainsRune(p, 0):
		return "", fmt.Errorf("a NUL byte in path %q", p)
	case len(p) > maxPathBytes:
		return "", fmt.Errorf("a path of %d bytes (at most %d)", len(p), maxPathBytes)
	case strings.HasPrefix(p, "/"):
		return "", fmt.Errorf("the absolute path %q", p)
	}
	for _, c := range strings.Split(p, "/") {
		if c == ".." {
			return "", fmt.Errorf("the path %q, which leaves the volume", p)
		}
		if len(c) > maxComponentBytes {
			return "", fmt.Errorf("a path component of %d bytes in %q (at most %d)", len(c), p, maxComponentBytes)
		}
	}
	clean := path.Clean(p)
	if clean == "." {
		return "", fmt.Errorf("the path %q, which names the volume's root", p)
	}
	return clean, nil
}

// entryKey is the cache key of an artifact's tar or raw layer: derived from
// its blob digest, in a name space of its own, so that it never meets an
// image layer's diffID (an ORAS file that is a tar must stay a file).
func entryKey(kind string, d v1.Hash) v1.Hash {
	sum := sha256.Sum256([]byte("strata artifact " + kind + "\x00" + d.String()))
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

// treeKey is the cache key of the tree of raw files: the sha256 of their
// sorted "path\x00digest" list, in a name space of its own.
func treeKey(files []RawFile) v1.Hash {
	h := sha256.New()
	h.Write([]byte("strata artifact tree v1"))
	for _, f := range files {
		h.Write([]byte("\x00" + f.Path + "\x00" + f.Layer.Digest.String()))
	}
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
}

// buildArtifact fills img from an artifact's manifest: its tar layers bottom
// first, with one tree of its raw files at the place of the last of them:
// tar layers that come after every raw file (a commit of a model's writes,
// which may replace or delete its files) are above the tree, the others
// below it. A path that leaves the
// volume makes the whole artifact unsafe; two layers at one path, or a
// file where another needs a directory, make it unsupported.
func buildArtifact(ref string, img *Image, doc *manifestDoc) error {
	if len(doc.Layers) > maxArtifactLayers {
		return fmt.Errorf("%w: %s has %d layers; an artifact may have at most %d", ErrUnsupported, ref, len(doc.Layers), maxArtifactLayers)
	}
	img.ArtifactType = doc.ArtifactType
	if img.ArtifactType == "" {
		img.ArtifactType = string(doc.Config.MediaType)
	}
	byPath := map[string]int{}
	treeAt := 0 // the tar layers below the tree
	for i, l := range doc.Layers {
		if err := checkDigest(l.Digest); err != nil {
			return err
		}
		if tarArtifactLayer(l) {
			img.Layers = append(img.Layers, Layer{DiffID: entryKey(kindArtifactTar, l.Digest), Digest: l.Digest, Size: l.Size, MediaType: l.MediaType, kind: artifactTar})
			continue
		}
		p := rawPathAnnotation(l)
		if p == "" {
			p = l.Digest.String()
		}
		clean, err := checkArtifactPath(p)
		if err != nil {
			return fmt.Errorf("%s: layer %d (blob %s) has %v: %w: nothing of it was kept", ref, i, l.Digest, err, ErrUnsafeLayer)
		}
		if j, dup := byPath[clean]; dup {
			return fmt.Errorf("%w: %s: layers %d and %d are both at path %q", ErrUnsupported, ref, j, i, clean)
		}
		byPath[clean] = i
		treeAt = len(img.Layers)
		img.Files = append(img.Files, RawFile{Path: clean, Layer: Layer{DiffID: entryKey(kindRaw, l.Digest), Digest: l.Digest, Size: l.Size, MediaType: l.MediaType, kind: artifactRaw}})
	}
	for p, i := range byPath {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if j, ok := byPath[d]; ok {
				return fmt.Errorf("%w: %s: layer %d is a file at %q, where layer %d needs a directory", ErrUnsupported, ref, j, d, i)
			}
		}
	}
	if len(img.Layers) >= maxLayers {
		return fmt.Errorf("%w: %s has %d tar layers; overlayfs stacks at most %d", ErrUnsupported, ref, len(img.Layers), maxLayers)
	}
	if len(img.Files) > 0 {
		sort.Slice(img.Files, func(i, j int) bool { return img.Files[i].Path < img.Files[j].Path })
		// The tree has no blob: its bytes are its raw files'.
		k := treeKey(img.Files)
		img.Layers = slices.Insert(img.Layers, treeAt, Layer{DiffID: k, Digest: k, MediaType: treeMediaType, kind: artifactTree})
	}
	return nil
}

// treeMediaType is the media type recorded for an artifact's tree.
const treeMediaType types.MediaType = "application/vnd.strata.artifact.tree.v1"
