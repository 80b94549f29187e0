// Package registryconf reads the node-wide registry configuration of the
// layer cache: per registry host, the mirrors to pull through, and how to
// reach the host (plain HTTP, extra CA bundles, a client certificate, or no
// certificate check). The ideas are containerd's hosts.toml; the format is
// one small YAML file, so that a ConfigMap can carry it:
//
//	registries:
//	  docker.io:                      # a registry as image references name it
//	    mirrors: [mirror.local:5000]  # tried in order, then docker.io itself
//	  mirror.local:5000:
//	    insecure: true                # plain HTTP
//	  registry.corp:
//	    ca: [/etc/strata/certs/corp-ca.pem]
//	    clientCert: {cert: /etc/strata/certs/client.pem, key: /etc/strata/certs/client-key.pem}
//
// Load validates everything it can before the configuration is used: an
// unknown key, a malformed host, an unreadable or empty CA bundle, or a
// certificate that does not match its key is an error naming the key, the
// host or the file. The package only reads; package layercache decides what
// the settings mean for a pull, and when to load the file again.
package registryconf

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"go.yaml.in/yaml/v3"
)

// Config is a loaded, validated registry configuration.
type Config struct {
	// Registries maps a registry host, in go-containerregistry's canonical
	// form ("index.docker.io" for "docker.io"), to its settings.
	Registries map[string]*Host
	// Files lists every file the configuration was read from: the file
	// itself, then the CA bundles and client certificates it names. A change
	// to any of them is a change to the configuration.
	Files []string
	// Digest is a hash of the content of Files, to tell a real change from
	// a file rewritten with the same content.
	Digest string
}

// Host is the configuration of one registry host.
type Host struct {
	// Mirrors are hosts (host or host:port) that serve this registry's
	// repositories under the same paths, tried in order before the
	// registry itself.
	Mirrors []string `yaml:"mirrors"`
	// Insecure lets the host be reached over plain HTTP.
	Insecure bool `yaml:"insecure"`
	// CA lists PEM files of certificate authorities trusted for this host,
	// in addition to the system's. A relative path is relative to the
	// configuration file's directory.
	CA []string `yaml:"ca"`
	// ClientCert is the certificate presented to a host that asks for one
	// (mutual TLS).
	ClientCert *ClientCert `yaml:"clientCert"`
	// SkipVerify turns off the check of the host's certificate: the
	// connection is encrypted but not authenticated. For tests only.
	SkipVerify bool `yaml:"skipVerify"`

	// TLS holds the client TLS settings built from CA, ClientCert and
	// SkipVerify; nil when the host has none of them.
	TLS *tls.Config `yaml:"-"`
}

// ClientCert names a PEM certificate (chain) and its private key.
type ClientCert struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// file is the document's shape.
type file struct {
	Registries map[string]*Host `yaml:"registries"`
}

// Load reads, parses and validates the configuration at path, and the
// certificate files it names.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(data, filepath.Dir(abs))
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	h.Write(data)
	c.Files = append([]string{abs}, c.Files...)
	for _, f := range c.Files[1:] {
		if err := hashFile(h, f); err != nil {
			return nil, err
		}
	}
	c.Digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	return c, nil
}

// hashFile adds a file's name and content to h.
func hashFile(h io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(h, "\x00%s\x00", path)
	_, err = io.Copy(h, f)
	return err
}

// Parse parses and validates a configuration document. Relative file names
// in it are taken relative to dir. Parse reads the certificate files, so
// that a broken one fails here rather than at the first pull.
func Parse(data []byte, dir string) (*Config, error) {
	var doc file
	dec := yaml.NewDecoder(bytes.NewReader(data))
	// An unknown key is a mistake to report, not a setting to ignore.
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse: %w", cleanYAMLError(err))
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("parse: more than one YAML document: write a single document with a registries: key")
	}
	c := &Config{Registries: map[string]*Host{}}
	for _, key := range sortedKeys(doc.Registries) {
		canon, err := canonicalHost(key)
		if err != nil {
			return nil, fmt.Errorf("registries: %w", err)
		}
		if _, dup := c.Registries[canon]; dup {
			return nil, fmt.Errorf("registries: %q is listed twice (as %s): merge the entries", key, canon)
		}
		h := doc.Registries[key]
		if h == nil {
			h = &Host{}
		}
		files, err := h.validate(canon, dir)
		if err != nil {
			return nil, fmt.Errorf("registries: %q: %w", key, err)
		}
		c.Files = append(c.Files, files...)
		c.Registries[canon] = h
	}
	return c, nil
}

// cleanYAMLError rewrites the decoder's Go type names into the words of the
// file: "line 3: field mirror not found in type registryconf.Host" becomes
// "line 3: unknown key \"mirror\"".
func cleanYAMLError(err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: unmarshal errors:\n  ")
	msg = unknownField.ReplaceAllString(msg, `unknown key "$1"`)
	msg = strings.ReplaceAll(msg, "\n  ", "; ")
	return errors.New(msg)
}

var unknownField = regexp.MustCompile(`field (\S+) not found in type \S+`)

func sortedKeys(m map[string]*Host) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// canonicalHost checks that s is a registry host as image references write
// it (host or host:port) and returns go-containerregistry's form of it,
// which maps docker.io to index.docker.io.
func canonicalHost(s string) (string, error) {
	if s == "" || strings.Contains(s, "/") {
		return "", fmt.Errorf("%q is not a registry host: write host or host:port, without a scheme or a path", s)
	}
	r, err := name.NewRegistry(s, name.StrictValidation)
	if err != nil {
		return "", fmt.Errorf("%q is not a registry host: %v", s, err)
	}
	return r.RegistryStr(), nil
}

// validate checks h, canonicalizes its mirrors, resolves its file names
// against dir and builds its TLS settings. It returns the files it read.
func (h *Host) validate(host, dir string) ([]string, error) {
	seen := map[string]bool{}
	for i, m := range h.Mirrors {
		canon, err := canonicalHost(m)
		if err != nil {
			return nil, fmt.Errorf("mirrors: %w", err)
		}
		if canon == host {
			return nil, fmt.Errorf("mirrors: %q is the registry itself: it is always tried last, do not list it", m)
		}
		if seen[canon] {
			return nil, fmt.Errorf("mirrors: %q is listed twice", m)
		}
		seen[canon] = true
		h.Mirrors[i] = canon
	}
	hasTLS := len(h.CA) > 0 || h.ClientCert != nil || h.SkipVerify
	if h.Insecure && hasTLS {
		return nil, errors.New("insecure (plain HTTP) excludes ca, clientCert and skipVerify (TLS settings): choose one")
	}
	if !hasTLS {
		return nil, nil
	}
	return h.buildTLS(dir)
}

// buildTLS reads the CA bundles and the client certificate into h.TLS.
func (h *Host) buildTLS(dir string) ([]string, error) {
	var files []string
	cfg := &tls.Config{InsecureSkipVerify: h.SkipVerify} //nolint:gosec // the operator asked for it, for this host only
	if len(h.CA) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		for i, p := range h.CA {
			p = resolve(dir, p)
			if p == "" {
				return nil, errors.New("ca: an empty file name")
			}
			pem, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("ca: %w", err)
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("ca: %s holds no PEM certificate", p)
			}
			h.CA[i] = p
			files = append(files, p)
		}
		cfg.RootCAs = pool
	}
	if cc := h.ClientCert; cc != nil {
		if cc.Cert == "" || cc.Key == "" {
			return nil, errors.New("clientCert: give both cert and key")
		}
		cc.Cert, cc.Key = resolve(dir, cc.Cert), resolve(dir, cc.Key)
		pair, err := tls.LoadX509KeyPair(cc.Cert, cc.Key)
		if err != nil {
			return nil, fmt.Errorf("clientCert: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
		files = append(files, cc.Cert, cc.Key)
	}
	h.TLS = cfg
	return files, nil
}

// resolve makes a relative file name relative to dir.
func resolve(dir, p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// Lookup returns the settings of a registry host (as RegistryStr of a
// go-containerregistry name gives it), or nil if the host is not listed.
func (c *Config) Lookup(host string) *Host {
	if c == nil {
		return nil
	}
	return c.Registries[host]
}
