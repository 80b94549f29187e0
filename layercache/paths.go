package layercache

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Directory and file names under the store root.
const (
	layersDir   = "layers/sha256"
	imagesDir   = "images/sha256"
	imageRefDir = "images/refs"
	refsDir     = "refs"
	tmpDir      = "tmp"
	lockFile    = "lock"
	metaFile    = "meta.json"
	fsDir       = "fs"
)

// validHex reports whether s is a lowercase hex sha256 digest. Every digest is
// checked before it is joined into a path, so a hostile manifest cannot name
// "../../etc" as a layer.
func validHex(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// checkDigest returns an error unless h is a well-formed sha256 digest.
func checkDigest(h v1.Hash) error {
	if h.Algorithm != "sha256" || !validHex(h.Hex) {
		return fmt.Errorf("%w: digest %q is not a sha256 digest", ErrUnsupported, h.String())
	}
	return nil
}

// layerPath is layers/sha256/<hex>, the committed directory of one layer.
func (s *Store) layerPath(diffID v1.Hash) (string, error) {
	if err := checkDigest(diffID); err != nil {
		return "", err
	}
	return filepath.Join(s.root, layersDir, diffID.Hex), nil
}

// blobPath is images/sha256/<hex>, a cached manifest, index or config.
func (s *Store) blobPath(d v1.Hash) (string, error) {
	if err := checkDigest(d); err != nil {
		return "", err
	}
	return filepath.Join(s.root, imagesDir, d.Hex), nil
}

// keyHex maps an arbitrary string (an image reference, an owner name) to a
// fixed-length file name.
func keyHex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// imageRefPath is where the resolution of one reference string is recorded.
func (s *Store) imageRefPath(ref string) string {
	return filepath.Join(s.root, imageRefDir, keyHex(ref)+".json")
}

// ownerPath is where one owner's references are recorded.
func (s *Store) ownerPath(owner string) string {
	return filepath.Join(s.root, refsDir, keyHex(owner)+".json")
}
