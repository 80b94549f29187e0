package credentials

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
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

// matchImage reports whether image (host[:port]/path) matches pattern, by
// the rules of kubelet's matchImages and of the keys of its keyring
// (k8s.io/kubernetes/pkg/credentialprovider.URLsMatch):
//   - the host has as many dot-separated parts as the pattern's, and each
//     part matches the pattern's part as a glob (so "*.io" never matches
//     "k8s.gcr.io", but "*.*.io" does);
//   - the port is the same (none in the pattern matches only none);
//   - the pattern's path, if any, is a string prefix of the image's path.
func matchImage(pattern, image string) bool {
	p, err := parseSchemeless(pattern)
	if err != nil {
		return false
	}
	t, err := parseSchemeless(image)
	if err != nil {
		return false
	}
	pParts, pPort := splitHost(p.Host)
	tParts, tPort := splitHost(t.Host)
	if pPort != tPort || len(pParts) != len(tParts) || !strings.HasPrefix(t.Path, p.Path) {
		return false
	}
	for i, part := range pParts {
		if ok, err := filepath.Match(part, tParts[i]); err != nil || !ok {
			return false
		}
	}
	return true
}

// parseSchemeless parses a URL written without a scheme, as url.Parse
// needs one.
func parseSchemeless(s string) (*url.URL, error) {
	u, err := url.Parse("https://" + s)
	if err != nil {
		return nil, err
	}
	u.Scheme = ""
	return u, nil
}

// splitHost splits host[:port] into its dot-separated parts and its port.
func splitHost(hostport string) ([]string, string) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host, port = hostport, ""
	}
	return strings.Split(host, "."), port
}

// auth is one set of credentials for the images its key matches.
type auth struct {
	Username, Password, IdentityToken string
	// from names the source for messages: "the volume's node-publish
	// secret", "service account secret NAME", "credential provider NAME".
	from string
}

// keyring holds credentials by key (a matchImages pattern) and finds the
// ones for an image as kubelet's BasicDockerKeyring does: the keys are
// tried in reverse lexical order, so that a longer key comes before a
// shorter one with the same prefix and a plain key before a wildcard one.
type keyring struct {
	keys  []string
	auths map[string]auth
}

// add adds credentials for key, which may carry a scheme and a /v1/ or /v2/
// path, as dockerconfig keys do. An existing key keeps its credentials: the
// source added first wins.
func (k *keyring) add(key string, a auth) {
	if !strings.HasPrefix(key, "https://") && !strings.HasPrefix(key, "http://") {
		key = "https://" + key
	}
	u, err := url.Parse(key)
	if err != nil {
		return // kubelet ignores such entries too
	}
	p := u.Path
	if strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/v2/") {
		p = p[3:]
	}
	key = u.Host
	if p != "" && p != "/" {
		key += p
	}
	if k.auths == nil {
		k.auths = map[string]auth{}
	}
	if _, ok := k.auths[key]; ok {
		return
	}
	k.auths[key] = a
	k.keys = append(k.keys, key)
	slices.Sort(k.keys)
	slices.Reverse(k.keys)
}

// defaultRegistryKey is the key legacy docker configs use for Docker Hub.
const defaultRegistryKey = "index.docker.io"

// lookup returns the credentials for im.
func (k *keyring) lookup(im image) (auth, bool) {
	if k == nil {
		return auth{}, false
	}
	for _, key := range k.keys {
		if matchImage(key, im.repo) {
			return k.auths[key], true
		}
	}
	if im.host == "docker.io" {
		if a, ok := k.auths[defaultRegistryKey]; ok {
			return a, true
		}
	}
	return auth{}, false
}

// len is the number of keys.
func (k *keyring) len() int {
	if k == nil {
		return 0
	}
	return len(k.keys)
}

// dockerConfigEntry is one registry's entry of a docker config.
type dockerConfigEntry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// errNotDockerConfig: a secret's data is not a docker config.
var errNotDockerConfig = errors.New("not a valid docker config")

// addDockerConfig adds the entries of a .dockerconfigjson document
// ({"auths": {...}}) or, if legacy, a .dockercfg one (the entries at the
// top level) to k.
func (k *keyring) addDockerConfig(data []byte, legacy bool, from string) error {
	var entries map[string]dockerConfigEntry
	if legacy {
		if err := json.Unmarshal(data, &entries); err != nil {
			return fmt.Errorf("%w: %v", errNotDockerConfig, err)
		}
	} else {
		var cfg struct {
			Auths map[string]dockerConfigEntry `json:"auths"`
		}
		if err := json.Unmarshal(data, &cfg); err != nil {
			return fmt.Errorf("%w: %v", errNotDockerConfig, err)
		}
		entries = cfg.Auths
	}
	// Sorted, so that duplicate keys resolve the same way every time.
	keys := make([]string, 0, len(entries))
	for key := range entries {
		keys = append(keys, key)
	}
	slices.Sort(keys)
	for _, key := range keys {
		e := entries[key]
		a := auth{Username: e.Username, Password: e.Password, IdentityToken: e.IdentityToken, from: from}
		if e.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(e.Auth)
			if err != nil {
				return fmt.Errorf("%w: entry %q: auth is not base64", errNotDockerConfig, key)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return fmt.Errorf("%w: entry %q: auth is not user:password", errNotDockerConfig, key)
			}
			a.Username, a.Password = user, pass
		}
		k.add(key, a)
	}
	return nil
}
