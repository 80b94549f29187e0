package testimage

import (
	"fmt"
	"net/http"
	"strings"
)

// LeakSecret is in every answer of a Leaky server: a client that reports a
// registry's error must not repeat it. A volume may name any host:port,
// node-local services included, and what the plugin reports ends up in pod
// events that the whole namespace reads.
const LeakSecret = "S3CR3T-node-local-answer-7f3a"

// LeakMode says what a Leaky server answers with LeakSecret.
type LeakMode string

const (
	// LeakPingText: every request gets a 404 HTML page, as a node-local web
	// service answers /v2/.
	LeakPingText LeakMode = "ping-text"
	// LeakPingJSON: every request gets a 403 OCI error whose message is
	// long and whose detail holds the secret.
	LeakPingJSON LeakMode = "ping-json"
	// LeakManifestText: the registry works, but manifests get a 404 with a
	// text body.
	LeakManifestText LeakMode = "manifest-text"
	// LeakManifestJSON: manifests get a 404 OCI error with a short,
	// registry-like message (MANIFEST_UNKNOWN "manifest unknown", which
	// may be reported) and a long one with the secret.
	LeakManifestJSON LeakMode = "manifest-json"
	// LeakToken: the registry asks for a bearer token, and the token
	// endpoint answers 200 with a JSON body that holds no token.
	LeakToken LeakMode = "token"
	// LeakBlob: the registry works (pushes too), but blob downloads get a
	// 400 with a text body.
	LeakBlob LeakMode = "blob"
)

// LeakyMessage is the long registry error message of LeakPingJSON and
// LeakManifestJSON; it holds LeakSecret.
var LeakyMessage = "access denied; the service says: " + strings.Repeat("x", 200) + " " + LeakSecret

// Leaky wraps a registry (see Server) so that it answers as mode says.
func Leaky(mode LeakMode) func(http.Handler) http.Handler {
	text := func(w http.ResponseWriter, code int) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(code)
		fmt.Fprintf(w, "<html><body>internal admin page\napi-token: %s\n</body></html>\n", LeakSecret)
	}
	ociErr := func(w http.ResponseWriter, code int, errs string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		fmt.Fprintf(w, `{"errors":[%s]}`, errs)
	}
	long := fmt.Sprintf(`{"code":"DENIED","message":%q,"detail":{"token":%q}}`, LeakyMessage, LeakSecret)
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			isManifest := strings.Contains(r.URL.Path, "/manifests/")
			isBlobGet := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
			switch {
			case mode == LeakPingText:
				text(w, http.StatusNotFound)
			case mode == LeakPingJSON:
				ociErr(w, http.StatusForbidden, long)
			case mode == LeakManifestText && isManifest:
				text(w, http.StatusNotFound)
			case mode == LeakManifestJSON && isManifest:
				ociErr(w, http.StatusNotFound, `{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"},`+
					strings.Replace(long, "DENIED", "NAME_UNKNOWN", 1))
			case mode == LeakToken && r.URL.Path == "/token":
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"service":"admin","session":%q}`, LeakSecret)
			case mode == LeakToken && strings.HasPrefix(r.URL.Path, "/v2/"):
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="leaky"`, r.Host))
				ociErr(w, http.StatusUnauthorized, `{"code":"UNAUTHORIZED","message":"authentication required"}`)
			case mode == LeakBlob && isBlobGet:
				text(w, http.StatusBadRequest)
			default:
				next.ServeHTTP(w, r)
			}
		})
	}
}
