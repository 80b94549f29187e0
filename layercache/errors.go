package layercache

import (
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache/unpack"
)

// Sentinel errors. Every error returned by the store wraps at most one of them
// (test with errors.Is), together with a message that names the image, layer or
// registry involved. Each has a fault.Kind, from which the CSI driver, the
// metrics and the strata CLI choose their code (fault.Of).
var (
	// ErrInvalidReference: the image reference cannot be parsed.
	ErrInvalidReference = fault.New(fault.Invalid, "invalid image reference")
	// ErrNotFound: the registry says the repository, tag, manifest or blob does
	// not exist.
	ErrNotFound = fault.New(fault.NotFound, "not found in registry")
	// ErrNotCached: the pull policy forbids contacting the registry and the
	// image is not in the cache.
	ErrNotCached = fault.New(fault.NotCached, "image not cached")
	// ErrUnauthorized: the registry refused the credentials (or their absence).
	ErrUnauthorized = fault.New(fault.Denied, "registry refused access")
	// ErrUnavailable: the registry could not be reached or answered with a
	// temporary error; retrying later may succeed.
	ErrUnavailable = fault.New(fault.Unavailable, "registry unavailable")
	// ErrDigestMismatch: a blob's content does not match its digest, or a
	// layer's uncompressed content does not match its diffID. Nothing was
	// stored.
	ErrDigestMismatch = fault.New(fault.Corrupt, "digest mismatch")
	// ErrUnsafeLayer: a layer tries to write outside its directory. Nothing of
	// it was stored.
	ErrUnsafeLayer = unpack.ErrUnsafe
	// ErrUnsupported: a manifest, media type or platform this store cannot use.
	ErrUnsupported = fault.New(fault.Invalid, "unsupported image")
	// ErrLayerMissing: Acquire named a layer that is not in the store (never
	// pulled, or pruned since). Ensure the image again and retry.
	ErrLayerMissing = fault.New(fault.Busy, "layer not in cache")
)

// ErrCorruptLayer: a layer blob matches its digest but cannot be decompressed
// or read as a tar. Nothing was stored.
var ErrCorruptLayer = fault.New(fault.Corrupt, "corrupt layer")

// ErrNoSpace: the cache budget cannot make room for a pull without evicting
// layers that volumes hold or used a moment ago.
var ErrNoSpace = fault.New(fault.NoSpace, "cache budget exceeded")

// ErrLayerTooLarge: a layer unpacks to more than one layer may take (see
// Limits). Nothing of it was stored. errors.Is(err, ErrNoSpace) is true
// for it too (and its kind is ErrNoSpace's): the node refuses the space, as
// it does past the budget.
var ErrLayerTooLarge = fault.Errorf(ErrNoSpace, "layer too large")
