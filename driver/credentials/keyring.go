package credentials

import (
	"fmt"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/strata-csi/strata/driver/credentials/dockerconfig"
)

// image is a reference reduced to what credentials are matched against, in
// the form kubelet gives to its keyring and to credential providers:
// host[:port]/repository, no scheme, tag or digest, Docker Hub as
// "docker.io".
type image struct {
	ref      string // as the volume names it
	repo     string // docker.io/library/busybox
	host     string // docker.io, 127.0.0.1:5000
	registry string // the registry as layercache names it (index.docker.io)
}

// parseImage reduces ref to an image.
func parseImage(ref string) (image, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return image{}, fmt.Errorf("image %q: %w", ref, err)
	}
	repo := r.Context()
	host := repo.RegistryStr()
	if host == name.DefaultRegistry {
		host = "docker.io"
	}
	return image{ref: ref, repo: host + "/" + repo.RepositoryStr(), host: host, registry: repo.RegistryStr()}, nil
}

// matchImage reports whether image (host[:port]/path) matches pattern by
// kubelet's rules (dockerconfig.Match).
func matchImage(pattern, image string) bool { return dockerconfig.Match(pattern, image) }

// auth is one set of credentials for the images its key matches.
type auth = dockerconfig.Auth

// keyring is a dockerconfig.Keyring, the one matcher of keys against
// images, looked up by image.
type keyring struct{ dockerconfig.Keyring }

// add adds credentials for key (see dockerconfig.Keyring.Add).
func (k *keyring) add(key string, a auth) { k.Add(key, a) }

// addDockerConfig adds the entries of a docker config, legacy (.dockercfg)
// or not (.dockerconfigjson), to k.
func (k *keyring) addDockerConfig(data []byte, legacy bool, from string) error {
	return k.AddDockerConfig(data, legacy, from)
}

// lookup returns the credentials for im.
func (k *keyring) lookup(im image) (auth, bool) {
	if k == nil {
		return auth{}, false
	}
	return k.Lookup(im.repo)
}

// len is the number of keys.
func (k *keyring) len() int {
	if k == nil {
		return 0
	}
	return k.Len()
}
