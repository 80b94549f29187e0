package registryconf

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// certFiles writes a self-signed certificate and its key to dir and returns
// their paths.
func certFiles(t *testing.T, dir, name string) (certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	write(t, certPath, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	write(t, keyPath, string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})))
	return certPath, keyPath
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	ca, _ := certFiles(t, dir, "ca")
	cert, key := certFiles(t, dir, "client")
	path := filepath.Join(dir, "registries.yaml")
	write(t, path, `
registries:
  docker.io:
    mirrors: ["mirror.local:5000", spegel.local:5001]
  mirror.local:5000:
    insecure: true
  registry.corp:
    ca: [ca.pem]
    clientCert: {cert: client.pem, key: `+key+`}
  test.local:
    skipVerify: true
  empty.example.com:
`)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	hub := c.Lookup("index.docker.io")
	if hub == nil || !slices.Equal(hub.Mirrors, []string{"mirror.local:5000", "spegel.local:5001"}) {
		t.Errorf("docker.io is looked up as index.docker.io with its mirrors; got %+v", hub)
	}
	if m := c.Lookup("mirror.local:5000"); m == nil || !m.Insecure || m.TLS != nil {
		t.Errorf("mirror.local:5000: %+v, want insecure without TLS settings", m)
	}
	corp := c.Lookup("registry.corp")
	if corp == nil || corp.TLS == nil || corp.TLS.RootCAs == nil || len(corp.TLS.Certificates) != 1 || corp.TLS.InsecureSkipVerify {
		t.Fatalf("registry.corp: %+v, want a CA pool and a client certificate", corp)
	}
	if corp.CA[0] != ca || corp.ClientCert.Cert != cert {
		t.Errorf("relative file names: ca %q, cert %q; want %q and %q (relative to the config's directory)", corp.CA[0], corp.ClientCert.Cert, ca, cert)
	}
	if tl := c.Lookup("test.local"); tl == nil || tl.TLS == nil || !tl.TLS.InsecureSkipVerify {
		t.Errorf("test.local: %+v, want skipVerify", tl)
	}
	if c.Lookup("empty.example.com") == nil || c.Lookup("other.example.com") != nil {
		t.Error("an entry without settings is listed; an absent one is not")
	}
	if want := []string{path, ca, cert, key}; !slices.Equal(c.Files, want) {
		t.Errorf("Files %q, want %q", c.Files, want)
	}

	// The digest follows the content of the certificate files too.
	d := c.Digest
	if c2, err := Load(path); err != nil || c2.Digest != d {
		t.Fatalf("a second load: digest %v (%v), want the same %s", c2, err, d)
	}
	certFiles(t, dir, "ca")
	if c3, err := Load(path); err != nil || c3.Digest == d {
		t.Errorf("after the CA changed: %v, digest unchanged: %v", err, c3 != nil && c3.Digest == d)
	}
}

func TestEmpty(t *testing.T) {
	for _, doc := range []string{"", "registries: {}", "# only a comment\n", "registries:\n"} {
		c, err := Parse([]byte(doc), "/")
		if err != nil || len(c.Registries) != 0 {
			t.Errorf("Parse(%q) = %v, %v; want an empty config", doc, c, err)
		}
	}
}

func TestRejects(t *testing.T) {
	dir := t.TempDir()
	cert, _ := certFiles(t, dir, "c")
	_, otherKey := certFiles(t, dir, "other")
	empty := filepath.Join(dir, "empty.pem")
	write(t, empty, "not a certificate\n")
	for _, tc := range []struct {
		name, doc string
		mention   []string
	}{
		{"unknown top-level key", "registry:\n  docker.io: {}\n", []string{`unknown key "registry"`, "line 1"}},
		{"unknown host key", "registries:\n  docker.io:\n    mirror: [m.local]\n", []string{`unknown key "mirror"`, "line 3"}},
		{"unknown clientCert key", "registries:\n  r.corp:\n    clientCert: {crt: a, key: b}\n", []string{`unknown key "crt"`}},
		{"mirrors not a list", "registries:\n  docker.io:\n    mirrors: m.local\n", []string{"line 3"}},
		{"insecure not a bool", "registries:\n  docker.io:\n    insecure: sometimes\n", []string{"line 3", "sometimes"}},
		{"host with a scheme", "registries:\n  https://r.corp: {}\n", []string{"https://r.corp", "without a scheme"}},
		{"host with a path", "registries:\n  r.corp/team: {}\n", []string{"r.corp/team"}},
		{"mirror with a scheme", "registries:\n  r.corp:\n    mirrors: [\"http://m.local\"]\n", []string{"http://m.local", "mirrors"}},
		{"mirror is the registry", "registries:\n  docker.io:\n    mirrors: [index.docker.io]\n", []string{"index.docker.io", "the registry itself"}},
		{"mirror twice", "registries:\n  r.corp:\n    mirrors: [m.local, m.local]\n", []string{"m.local", "twice"}},
		{"host twice", "registries:\n  docker.io: {}\n  index.docker.io: {}\n", []string{"twice"}},
		{"duplicate key", "registries:\n  r.corp: {}\n  r.corp: {}\n", []string{"r.corp"}},
		{"insecure with TLS", "registries:\n  r.corp:\n    insecure: true\n    skipVerify: true\n", []string{"r.corp", "insecure"}},
		{"CA file missing", "registries:\n  r.corp:\n    ca: [nope.pem]\n", []string{filepath.Join(dir, "nope.pem")}},
		{"CA file without a certificate", "registries:\n  r.corp:\n    ca: [" + empty + "]\n", []string{empty, "no PEM certificate"}},
		{"client cert without key", "registries:\n  r.corp:\n    clientCert: {cert: " + cert + "}\n", []string{"clientCert", "both"}},
		{"client cert with the wrong key", "registries:\n  r.corp:\n    clientCert: {cert: " + cert + ", key: " + otherKey + "}\n", []string{"clientCert"}},
		{"two documents", "registries: {}\n---\nregistries: {}\n", []string{"more than one"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc), dir)
			if err == nil {
				t.Fatalf("Parse accepted %q", tc.doc)
			}
			for _, m := range tc.mention {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("Parse(%q) = %v, want a mention of %q", tc.doc, err, m)
				}
			}
		})
	}
}
