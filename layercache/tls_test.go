package layercache

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// issue makes a certificate for 127.0.0.1 and localhost (a server's) or for
// a client, and returns it with its PEM files' content.
func (ca *testCA) issue(t testing.TB, cn string, client bool) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		tmpl.IPAddresses, tmpl.DNSNames = nil, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair, certPEM, keyPEM
}

// tlsRegistry serves a registry over HTTPS with cert; with clientCAs, it
// demands a client certificate signed by one of them (mutual TLS).
func tlsRegistry(t testing.TB, cert tls.Certificate, clientCAs *x509.CertPool) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are the point
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	if clientCAs != nil {
		srv.TLS.ClientAuth = tls.RequireAndVerifyClientCert
		srv.TLS.ClientCAs = clientCAs
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "https://")
}

// pushOverTLS pushes the sample image to a TLS registry, trusting ca and
// presenting client if set.
func pushOverTLS(t testing.TB, ref string, ca *testCA, client *tls.Certificate) {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: ca.pool()}
	if client != nil {
		tr.TLSClientConfig.Certificates = []tls.Certificate{*client}
	}
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithTransport(tr))
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A registry whose certificate the system does not trust is refused, with an
// error that names it and says to add its CA; with the CA in the config, or
// with skipVerify, it serves.
func TestRegistryCA(t *testing.T) {
	ca := newTestCA(t, "strata test CA")
	serverCert, _, _ := ca.issue(t, "registry", false)
	reg := tlsRegistry(t, serverCert, nil)
	ref := reg + "/data/set:v1"
	pushOverTLS(t, ref, ca, nil)
	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.pem", ca.pem)

	t.Run("without the CA", func(t *testing.T) {
		s := openStore(t, t.TempDir())
		_, err := s.Pull(context.Background(), ref, PullOptions{})
		if err == nil || !strings.Contains(err.Error(), reg) || !strings.Contains(err.Error(), "certificate") || !strings.Contains(err.Error(), "ca list") {
			t.Fatalf("Pull = %v, want an error naming %s, its certificate, and the ca setting", err, reg)
		}
		t.Logf("the error: %v", err)
	})
	t.Run("a CA that did not sign it", func(t *testing.T) {
		other := writeFile(t, t.TempDir(), "other.pem", newTestCA(t, "another CA").pem)
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    ca: [%q]\n", reg, other))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		if _, err := s.Pull(context.Background(), ref, PullOptions{}); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("Pull = %v, want a certificate error", err)
		}
	})
	t.Run("with the CA", func(t *testing.T) {
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    ca: [%q]\n", reg, caFile))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, ref, PullOptions{})
	})
	t.Run("with the CA named relative to the config", func(t *testing.T) {
		conf := writeRegistryConfig(t, filepath.Join(dir, "registries.yaml"), fmt.Sprintf("registries:\n  %q:\n    ca: [ca.pem]\n", reg))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, ref, PullOptions{})
	})
	t.Run("skipVerify", func(t *testing.T) {
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    skipVerify: true\n", reg))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, ref, PullOptions{})
	})
	t.Run("a CA file replaced in place is reloaded", func(t *testing.T) {
		// A Secret update rotates the CA without touching the config.
		caDir := t.TempDir()
		rotating := writeFile(t, caDir, "ca.pem", newTestCA(t, "old CA").pem)
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    ca: [%q]\n", reg, rotating))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf), WithRetry(1, 0))
		if _, err := s.Pull(context.Background(), ref, PullOptions{}); err == nil {
			t.Fatal("Pull with the old CA succeeded")
		}
		writeFile(t, caDir, "ca.pem", ca.pem)
		pullAndCheck(t, s, ref, PullOptions{})
	})
}

// A registry that demands a client certificate refuses the node without
// one, with an error that says to set clientCert, and serves it with one.
func TestRegistryClientCert(t *testing.T) {
	serverCA := newTestCA(t, "server CA")
	clientCA := newTestCA(t, "client CA")
	serverCert, _, _ := serverCA.issue(t, "registry", false)
	clientCert, clientPEM, clientKey := clientCA.issue(t, "node", true)
	reg := tlsRegistry(t, serverCert, clientCA.pool())
	ref := reg + "/data/set:v1"
	pushOverTLS(t, ref, serverCA, &clientCert)
	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.pem", serverCA.pem)
	certFile := writeFile(t, dir, "client.pem", clientPEM)
	keyFile := writeFile(t, dir, "client-key.pem", clientKey)

	t.Run("without the client certificate", func(t *testing.T) {
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    ca: [%q]\n", reg, caFile))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		_, err := s.Pull(context.Background(), ref, PullOptions{})
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), reg) || !strings.Contains(err.Error(), "clientCert") {
			t.Fatalf("Pull = %v, want ErrUnavailable naming %s and clientCert", err, reg)
		}
		t.Logf("the error: %v", err)
	})
	t.Run("with the client certificate", func(t *testing.T) {
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    ca: [%q]\n    clientCert: {cert: %q, key: %q}\n", reg, caFile, certFile, keyFile))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, ref, PullOptions{})
	})
}

// A mirror reached over TLS with its own CA, in front of a registry that is
// down: the per-host settings apply to mirrors too.
func TestMirrorOverTLS(t *testing.T) {
	ca := newTestCA(t, "mirror CA")
	serverCert, _, _ := ca.issue(t, "mirror", false)
	mirror := tlsRegistry(t, serverCert, nil)
	up := closedPort(t)
	pushOverTLS(t, mirror+"/data/set:v1", ca, nil)
	caFile := writeFile(t, t.TempDir(), "ca.pem", ca.pem)
	conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n  %q:\n    ca: [%q]\n", up, mirror, mirror, caFile))
	s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
	pullAndCheck(t, s, up+"/data/set:v1", PullOptions{})
}
