package commit

import (
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

type v1Hash = v1.Hash

func sha256Of(r io.Reader) (string, int64, error) {
	h, n, err := v1.SHA256(r)
	return h.String(), n, err
}
