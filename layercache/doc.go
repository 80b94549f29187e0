// Package layercache is a node's content-addressed store of unpacked OCI image
// layers.
//
// It resolves image references to manifests (caching them by digest so that
// resolution works offline), fetches layer blobs with go-containerregistry,
// verifies them while streaming (compressed digest, then diffID), unpacks each
// layer into a directory usable as an overlayfs lower dir, and keeps per-owner
// references so that a layer in use is never pruned.
//
// Layout under the store root (docs/layercache.md, "On disk", says more):
//
//	layers/sha256/<diffID>/fs/        unpacked layer, overlayfs whiteouts
//	layers/sha256/<diffID>/meta.json  sizes, compressed digest, media type
//	layers/sha256/<diffID>/access.json  blob digests that produce it, repositories that served it, public
//	images/sha256/<digest>            manifests, indexes and configs by digest
//	images/refs/<sha256(ref)>.json    what a tag or digest reference resolved to
//	images/access/<sha256(repo@digest)>.json  credentials (by hash) the registry accepted for an image
//	images/access/public-sha256-<hex>  a registry served this manifest to no credentials
//	refs/<sha256(owner)>.json         the layers one owner (a volume) uses
//	tmp/<id>/                         one live process's in-progress work
//
// Every file and directory appears complete or not at all: work happens in
// tmp/, is made durable, and is renamed into place. A crash leaves only tmp/
// debris, which the next Open removes. All state lives on disk, guarded by a
// file lock, so the CSI plugin and the strata CLI can share one root.
//
// Registries are reached directly, or through the mirrors, plain-HTTP hosts
// and per-host TLS settings of a node-wide registry config
// (WithRegistryConfig, package registryconf), which is reloaded when its file
// changes.
//
// The package knows OCI and disks, and nothing about CSI or gRPC: errors wrap
// the sentinel values below, and the caller maps them to its own protocol.
package layercache
