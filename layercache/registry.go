package layercache

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"unicode/utf8"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"k8s.io/klog/v2"
)

// isLoopback reports whether host ("host" or "host:port") is a loopback
// address, the only registries reached over plain HTTP without being listed
// as insecure.
func isLoopback(host string) bool {
	h := host
	if sh, _, err := net.SplitHostPort(host); err == nil {
		h = sh
	}
	h = strings.Trim(h, "[]")
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// httpsOnly refuses to let go-containerregistry speak plain HTTP to a
// registry that is neither loopback nor configured as insecure: its default
// also uses HTTP for private-range addresses and *.local names, which would
// send credentials and layers unencrypted across the network.
//
// A host with TLS settings in the registry config (tlsHosts) is reached over
// HTTPS only, loopback too: its operator asked for a verified connection.
type httpsOnly struct {
	next     http.RoundTripper
	insecure map[string]bool
	tlsHosts map[string]bool
}

func (t *httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Host
	if req.URL.Scheme == "http" && (t.tlsHosts[host] || !isLoopback(host) && !t.insecure[host]) {
		r := req.Clone(req.Context())
		r.URL.Scheme = "https"
		return t.next.RoundTrip(r)
	}
	return t.next.RoundTrip(req)
}

// parseReference parses ref, marking loopback and configured registries as
// reachable over plain HTTP under the view h.
func parseReference(h *hosts, ref string) (name.Reference, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %v", ErrInvalidReference, ref, err)
	}
	if h.plainHTTP(r.Context().RegistryStr()) {
		r, err = name.ParseReference(ref, name.Insecure)
		if err != nil {
			return nil, fmt.Errorf("%w %q: %v", ErrInvalidReference, ref, err)
		}
	}
	return r, nil
}

// client talks to one repository of one registry with one set of
// credentials.
type client struct {
	repo name.Repository
	http *http.Client
}

// newClient authenticates to an endpoint for pulling (a ping and, for token
// auth, a token exchange) with what kc holds for it, with the transports of
// the view h.
func (s *Store) newClient(ctx context.Context, h *hosts, ep *endpoint, kc authn.Keychain) (*client, error) {
	auth, err := ep.authenticator(kc)
	if err != nil {
		return nil, err
	}
	var base http.RoundTripper = &httpsOnly{next: h, insecure: h.insecure, tlsHosts: h.tlsHosts}
	what := "connect to registry " + ep.host()
	if ep.mirror {
		base = &headerTimeout{next: base, d: s.opts.mirrorTimeout}
		what = "connect to mirror " + ep.host()
	}
	// Outside the mirror's header timeout: a wait for a rate limit is no
	// silence of the mirror's.
	base = &rateGate{next: base, lim: s.limits, wait: !ep.mirror}
	repo := ep.repo
	rt, err := transport.NewWithContext(ctx, repo.Registry, auth,
		transport.NewUserAgent(base, s.opts.userAgent), []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, classify(err, what)
	}
	return &client{repo: repo, http: &http.Client{Transport: rt}}, nil
}

// manifestAccept lists the manifest media types this store understands.
var manifestAccept = strings.Join([]string{
	string(types.OCIImageIndex), string(types.OCIManifestSchema1),
	string(types.DockerManifestList), string(types.DockerManifestSchema2),
}, ",")

func (c *client) url(kind, ref string) string {
	return fmt.Sprintf("%s://%s/v2/%s/%s/%s", c.repo.Scheme(), c.repo.RegistryStr(), c.repo.RepositoryStr(), kind, ref)
}

// maxManifestSize bounds a manifest or config read into memory.
const maxManifestSize = 8 << 20

// manifest fetches a manifest by tag or digest. It returns its bytes, media
// type and digest; a manifest fetched by digest is verified against it.
func (c *client) manifest(ctx context.Context, ref string) ([]byte, types.MediaType, v1.Hash, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("manifests", ref), nil)
	if err != nil {
		return nil, "", v1.Hash{}, err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, "", v1.Hash{}, classify(err, "fetch manifest "+c.repo.String()+":"+ref)
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		return nil, "", v1.Hash{}, classify(err, "fetch manifest "+c.repo.String()+":"+ref)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return nil, "", v1.Hash{}, classify(err, "read manifest "+c.repo.String()+":"+ref)
	}
	if len(data) > maxManifestSize {
		return nil, "", v1.Hash{}, fmt.Errorf("%w: manifest %s:%s is larger than %d bytes", ErrUnsupported, c.repo, ref, maxManifestSize)
	}
	d, _, err := v1.SHA256(strings.NewReader(string(data)))
	if err != nil {
		return nil, "", v1.Hash{}, err
	}
	if want, err := v1.NewHash(ref); err == nil && want != d {
		return nil, "", v1.Hash{}, fmt.Errorf("%w: manifest %s@%s has digest %s", ErrDigestMismatch, c.repo, want, d)
	}
	return data, types.MediaType(resp.Header.Get("Content-Type")), d, nil
}

// classify wraps a registry or network error with the sentinel that tells a
// caller what to do about it.
//
// The message never repeats what the registry sent: it ends up in the
// gRPC status and the pod's events, which anyone in the namespace reads,
// and a volume may name any host:port, node-local services included (the
// plugin is on the host network). A registry's answer is reported by its
// HTTP status and error codes (registryErrorText); other errors by their
// first line, bounded (boundText), without the parts that change from one
// attempt to the next (stableText), so that Kubernetes counts a repeated
// failure as one event. The full answer, truncated, is logged at --v=4,
// the full text of another error at --v=2.
func classify(err error, what string) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", what, err)
	}
	if terr := classifyTLS(err, what); terr != nil {
		return terr
	}
	var rl *RateLimitError
	if errors.As(err, &rl) {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, what, rl)
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		klog.V(4).InfoS("Registry answered with an error", "what", what, "status", terr.StatusCode,
			"answer", truncate(err.Error(), maxLoggedAnswer))
		safe := &registryError{msg: registryErrorText(terr), err: err}
		switch {
		case terr.StatusCode == http.StatusUnauthorized || terr.StatusCode == http.StatusForbidden || hasCode(terr, transport.UnauthorizedErrorCode, transport.DeniedErrorCode):
			return fmt.Errorf("%w: %s: %v: check the pull secret", ErrUnauthorized, what, safe)
		case terr.StatusCode == http.StatusNotFound || hasCode(terr, transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode):
			return fmt.Errorf("%w: %s: %v: check the image name and tag", ErrNotFound, what, safe)
		case terr.StatusCode == http.StatusTooManyRequests || terr.StatusCode >= 500 || terr.Temporary():
			return fmt.Errorf("%w: %s: %v", ErrUnavailable, what, safe)
		}
		return fmt.Errorf("%s: %w", what, safe)
	}
	safe := &registryError{msg: boundText(stableText(err)), err: err}
	if safe.msg != err.Error() {
		klog.V(2).InfoS("Registry request failed", "what", what, "err", truncate(err.Error(), maxLoggedAnswer))
	}
	var nerr net.Error
	var operr *net.OpError
	var uerr *url.Error
	if errors.As(err, &nerr) || errors.As(err, &operr) || errors.As(err, &uerr) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %s: %v", ErrUnavailable, what, safe)
	}
	return fmt.Errorf("%s: %w", what, safe)
}

const (
	// maxRegistryMessage bounds a registry's own error message that is
	// reported: "manifest unknown" is, a page of text is not.
	maxRegistryMessage = 64
	// maxRegistryCodes bounds the error codes reported of one answer.
	maxRegistryCodes = 4
	// maxErrorText bounds the text of another error from a registry
	// request (a network error with its URL).
	maxErrorText = 256
	// maxLoggedAnswer bounds the registry answer logged at --v=4.
	maxLoggedAnswer = 1024
)

// registryError shows msg, a text fit for a pod's events, and keeps err for
// errors.Is and errors.As.
type registryError struct {
	msg string
	err error
}

func (e *registryError) Error() string { return e.msg }
func (e *registryError) Unwrap() error { return e.err }

// registryErrorText describes a registry's error answer by what the
// registry cannot use to smuggle text out: the HTTP status, the OCI error
// codes (of the form [A-Z_]+), and a code's message only when it is short
// and printable, as registries' own messages are ("manifest unknown").
// Never the body, the details, or the URL (which a redirect may have
// chosen).
func registryErrorText(e *transport.Error) string {
	text := fmt.Sprintf("the registry answered %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	var codes []string
	for i, d := range e.Errors {
		if i == maxRegistryCodes {
			codes = append(codes, fmt.Sprintf("and %d more", len(e.Errors)-i))
			break
		}
		code := string(d.Code)
		if !isErrorCode(code) {
			code = "(unknown code)"
		}
		if m := d.Message; m != "" && len(m) <= maxRegistryMessage && isPlain(m) {
			code += " (" + m + ")"
		}
		codes = append(codes, code)
	}
	if len(codes) > 0 {
		text += ": " + strings.Join(codes, ", ")
	}
	return text
}

// isErrorCode reports whether s looks like an OCI error code
// (MANIFEST_UNKNOWN).
func isErrorCode(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for _, r := range s {
		if (r < 'A' || r > 'Z') && r != '_' {
			return false
		}
	}
	return true
}

// isPlain reports whether s is printable ASCII.
func isPlain(s string) bool {
	for _, r := range s {
		if r < 0x20 || r > 0x7e {
			return false
		}
	}
	return true
}

// boundText is the first line of s, at most maxErrorText bytes: enough for a
// network error and its URL, not for a body that an error of a library
// quotes (go-containerregistry's "no token in bearer response:\n<body>").
func boundText(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = strings.TrimSpace(s[:i]) + " [...]"
	}
	return truncate(s, maxErrorText)
}

// truncate cuts s to at most n bytes, at a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "[...]"
}

func hasCode(e *transport.Error, codes ...transport.ErrorCode) bool {
	for _, d := range e.Errors {
		for _, c := range codes {
			if d.Code == c {
				return true
			}
		}
	}
	return false
}

// tlsSetupError marks a TLS failure that the node's configuration must fix:
// a retry cannot help, so none is made.
type tlsSetupError struct{ error }

func (e tlsSetupError) Unwrap() error { return e.error }

// classifyTLS explains a failed TLS handshake, or returns nil for any other
// error. These are configuration problems of the node: the message says
// which key of the registry config fixes them.
func classifyTLS(err error, what string) error {
	var verr *tls.CertificateVerificationError
	switch {
	case errors.As(err, &verr):
		return tlsSetupError{fmt.Errorf("%w: %s: %v: the registry's TLS certificate is not trusted: "+
			"add the CA that signed it to the host's ca list in the registry config (--registry-config)",
			ErrUnavailable, what, err)}
	case refusedClientCert(err):
		return tlsSetupError{fmt.Errorf("%w: %s: %v: the registry wants a TLS client certificate that it accepts: "+
			"set the host's clientCert in the registry config (--registry-config)",
			ErrUnavailable, what, err)}
	}
	return nil
}

// refusedClientCert reports whether err is the TLS alert a server sends when
// it refuses the client's certificate or its absence (bad_certificate,
// certificate_required: RFC 8446, section 6). crypto/tls reports a received
// alert as a net.OpError "remote error" around an unexported type, so the
// alert is told by its text.
func refusedClientCert(err error) bool {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "remote error" || op.Err == nil {
		return false
	}
	msg := op.Err.Error()
	return strings.HasSuffix(msg, "certificate required") || strings.HasSuffix(msg, "bad certificate")
}
