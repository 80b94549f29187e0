package layercache

import (
	"errors"

	"github.com/strata-csi/strata/layercache/unpack"
)

// Sentinel errors. Every error returned by the store wraps at most one of them
// (test with errors.Is), together with a message that names the image, layer or
// registry involved.
var (
	// ErrInvalidReference: the image reference cannot be parsed.
	ErrInvalidReference = errors.New("invalid image reference")
	// ErrNotFound: the registry says the repository, tag, manifest or blob does
	// not exist.
	ErrNotFound = errors.New("not found in registry")
	// ErrNotCached: the pull policy forbids contacting the registry and the
	// image is not in the cache.
	ErrNotCached = errors.New("image not cached")
	// ErrUnauthorized: the registry refused the credentials (or their absence).
	ErrUnauthorized = errors.New("registry refused access")
	// ErrUnavailable: the registry could not be reached or answered with a
	// temporary error; retrying later may succeed.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrDigestMismatch: a blob's content does not match its digest, or a
	// layer's uncompressed content does not match its diffID. Nothing was
	// stored.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrUnsafeLayer: a layer tries to write outside its directory. Nothing of
	// it was stored.
	ErrUnsafeLayer = unpack.ErrUnsafe
	// ErrUnsupported: a manifest, media type or platform this store cannot use.
	ErrUnsupported = errors.New("unsupported image")
	// ErrLayerMissing: Acquire named a layer that is not in the store (never
	// pulled, or pruned since). Ensure the image again and retry.
	ErrLayerMissing = errors.New("layer not in cache")
)

// ErrCorruptLayer: a layer blob matches its digest but cannot be decompressed
// or read as a tar. Nothing was stored.
var ErrCorruptLayer = errors.New("corrupt layer")

// ErrNoSpace: the cache budget cannot make room for a pull without evicting
// layers that volumes hold or used a moment ago.
var ErrNoSpace = errors.New("cache budget exceeded")

// ErrLayerTooLarge: a layer unpacks to more than one layer may take (see
// Limits). Nothing of it was stored. errors.Is(err, ErrNoSpace) is true
// for it too: the node refuses the space, as it does past the budget.
var ErrLayerTooLarge error = layerTooLarge{}

type layerTooLarge struct{}

func (layerTooLarge) Error() string        { return "layer too large" }
func (layerTooLarge) Is(target error) bool { return target == ErrNoSpace }
