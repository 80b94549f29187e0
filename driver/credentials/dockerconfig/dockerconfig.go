// Package dockerconfig is Strata's one reader of docker configs, the data
// of Kubernetes pull secrets (.dockerconfigjson, and the legacy .dockercfg),
// and its one matcher of their keys against images, by the rules of
// kubelet's credential keyring: host globs, ports, path prefixes, the most
// specific key first. A Keyring is an authn.Keychain, the type the layer
// cache takes credentials as.
//
// It depends on no Kubernetes package, so that the strata CLI reads a docker
// config exactly as the plugin reads a pull secret, without linking
// client-go.
//
// go-containerregistry's pkg/authn/kubernetes implements the same keyring,
// but differs where it matters here: it matches Docker Hub images as
// index.docker.io/..., so that a secret keyed "docker.io" (as kubelet
// accepts it) gives nothing; it cannot tell which secret a match came from,
// which the driver's messages name; and it takes only Secret objects, while
// credential providers answer with keys of their own.
package dockerconfig

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

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Match reports whether image (host[:port]/path, Docker Hub as docker.io)
// matches pattern, by the rules of kubelet's matchImages and of the keys of
// its credential keyring:
//   - the host has as many dot-separated parts as the pattern's, and each
//     part matches the pattern's part as a glob (so "*.io" never matches
//     "k8s.gcr.io", but "*.*.io" does);
//   - the port is the same (none in the pattern matches only none);
//   - the pattern's path, if any, is a string prefix of the image's path.
func Match(pattern, image string) bool {
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

// CheckPattern returns why pattern (a matchImages entry, or a key) cannot
// be matched against anything, or nil.
func CheckPattern(pattern string) error {
	_, err := parseSchemeless(pattern)
	return err
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

// Repo is the form kubelet matches keys against, host[:port]/path with
// Docker Hub as docker.io, of a repository (or registry) as
// go-containerregistry names it (index.docker.io/library/busybox).
func Repo(r authn.Resource) string {
	reg := r.RegistryStr()
	path := strings.TrimPrefix(strings.TrimPrefix(r.String(), reg), "/")
	host := reg
	if host == name.DefaultRegistry {
		host = "docker.io"
	}
	if path == "" {
		return host
	}
	return host + "/" + path
}

// Auth is one set of credentials for the images its key matches.
type Auth struct {
	Username, Password, IdentityToken string
	// From names the source for messages: "the volume's node-publish
	// secret", "service account secret NAME", "credential provider NAME".
	From string
}

// config is what the layer cache hashes into an access record: the same
// fields for the same credentials, whichever keychain hands them out.
func (a Auth) config() authn.AuthConfig {
	return authn.AuthConfig{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken}
}

// Keyring holds credentials by key (a matchImages pattern) and finds the
// ones for an image as kubelet's BasicDockerKeyring does: the keys are
// tried in reverse lexical order, so that a longer key comes before a
// shorter one with the same prefix and a plain key before a wildcard one.
// The zero Keyring is empty.
type Keyring struct {
	keys  []string
	auths map[string]Auth
}

var _ authn.Keychain = (*Keyring)(nil)

// Add adds credentials for key, which may carry a scheme and a /v1/ or /v2/
// path, as dockerconfig keys do. An existing key keeps its credentials: the
// source added first wins.
func (k *Keyring) Add(key string, a Auth) {
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
		k.auths = map[string]Auth{}
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

// Lookup returns the credentials for repo (host[:port]/path, Docker Hub as
// docker.io).
func (k *Keyring) Lookup(repo string) (Auth, bool) {
	if k == nil {
		return Auth{}, false
	}
	for _, key := range k.keys {
		if Match(key, repo) {
			return k.auths[key], true
		}
	}
	if host, _, _ := strings.Cut(repo, "/"); host == "docker.io" {
		if a, ok := k.auths[defaultRegistryKey]; ok {
			return a, true
		}
	}
	return Auth{}, false
}

// Resolve returns the credentials for the repository r, anonymous when no
// key matches it.
func (k *Keyring) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if a, ok := k.Lookup(Repo(r)); ok {
		return authn.FromConfig(a.config()), nil
	}
	return authn.Anonymous, nil
}

// Len is the number of keys.
func (k *Keyring) Len() int {
	if k == nil {
		return 0
	}
	return len(k.keys)
}

// entry is one registry's entry of a docker config.
type entry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// ErrNotDockerConfig: a secret's data is not a docker config.
var ErrNotDockerConfig = errors.New("not a valid docker config")

// AddDockerConfig adds the entries of a .dockerconfigjson document
// ({"auths": {...}}) or, if legacy, a .dockercfg one (the entries at the
// top level) to k, each with from as its source.
func (k *Keyring) AddDockerConfig(data []byte, legacy bool, from string) error {
	var entries map[string]entry
	if legacy {
		if err := json.Unmarshal(data, &entries); err != nil {
			return fmt.Errorf("%w: %v", ErrNotDockerConfig, err)
		}
	} else {
		var cfg struct {
			Auths map[string]entry `json:"auths"`
		}
		if err := json.Unmarshal(data, &cfg); err != nil {
			return fmt.Errorf("%w: %v", ErrNotDockerConfig, err)
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
		a := Auth{Username: e.Username, Password: e.Password, IdentityToken: e.IdentityToken, From: from}
		if e.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(e.Auth)
			if err != nil {
				return fmt.Errorf("%w: entry %q: auth is not base64", ErrNotDockerConfig, key)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return fmt.Errorf("%w: entry %q: auth is not user:password", ErrNotDockerConfig, key)
			}
			a.Username, a.Password = user, pass
		}
		k.Add(key, a)
	}
	return nil
}

// ForRegistries returns a keychain that answers with a for every repository
// of the given registries (host[:port] as go-containerregistry names them:
// index.docker.io for Docker Hub), and anonymously for any other host, so
// that a mirror of one of them never sees its credentials.
func ForRegistries(a Auth, registries ...string) authn.Keychain {
	return registryKeychain{auth: a, registries: registries}
}

type registryKeychain struct {
	auth       Auth
	registries []string
}

func (k registryKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if !slices.Contains(k.registries, r.RegistryStr()) {
		return authn.Anonymous, nil
	}
	return authn.FromConfig(k.auth.config()), nil
}
