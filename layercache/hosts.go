package layercache

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/layercache/registryconf"
)

// WithRegistryConfig reads the node's registry configuration from path (see
// package registryconf and docs/registries.md): mirrors tried before a
// registry, hosts reached over plain HTTP, and per-host CA bundles, client
// certificates and skipVerify. Without it a store reaches every registry
// directly, as before.
//
// The file must exist and be valid when the store opens. It is checked again
// at each Resolve and Ensure (a stat of it and of the certificate files it
// names), and loaded again when it changed: a ConfigMap update takes effect
// without a restart. An invalid new version is logged and ignored, and the
// last good configuration stays in force.
func WithRegistryConfig(path string) Option {
	return func(o *options) error {
		if path == "" {
			return errors.New("registry config: the file name must not be empty")
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			return fmt.Errorf("registry config %s: %w", path, err)
		}
		o.registryConfig = abs
		return nil
	}
}

// DefaultMirrorTimeout bounds the wait for a mirror's answer (its response
// headers; a body may take as long as it needs) before the next mirror or the
// registry is tried. A mirror on the node's network answers in milliseconds;
// one that hangs must not use up the caller's whole deadline.
const DefaultMirrorTimeout = 10 * time.Second

// withMirrorTimeout overrides DefaultMirrorTimeout, for tests.
func withMirrorTimeout(d time.Duration) Option {
	return func(o *options) error {
		o.mirrorTimeout = d
		return nil
	}
}

// hosts is one immutable view of the registry configuration, with the HTTP
// transports it needs. A pull takes one view and keeps it to the end, so a
// reload never changes the rules under a request in flight.
type hosts struct {
	conf *registryconf.Config // nil without a config file
	// insecure holds the hosts reached over plain HTTP: those listed with
	// WithInsecureRegistries and those marked insecure in the file.
	insecure map[string]bool
	// tlsHosts have TLS settings in the file: they are reached over HTTPS
	// only, loopback too.
	tlsHosts map[string]bool
	// transports has one transport per host with TLS settings; every other
	// host uses base.
	transports map[string]*http.Transport
	base       http.RoundTripper
}

var _ http.RoundTripper = (*hosts)(nil)

// RoundTrip sends req with the transport of its host.
func (h *hosts) RoundTrip(req *http.Request) (*http.Response, error) {
	if t, ok := h.transports[req.URL.Host]; ok {
		return t.RoundTrip(req)
	}
	return h.base.RoundTrip(req)
}

// mirrors lists the mirrors configured for a registry host, in order.
func (h *hosts) mirrors(registry string) []string {
	if c := h.conf.Lookup(registry); c != nil {
		return c.Mirrors
	}
	return nil
}

// plainHTTP reports whether host may be reached over plain HTTP.
func (h *hosts) plainHTTP(host string) bool {
	return h.insecure[host] || (isLoopback(host) && !h.tlsHosts[host])
}

// registry parses a host, allowing plain HTTP where the configuration does.
func (h *hosts) registry(host string) (name.Registry, error) {
	if h.plainHTTP(host) {
		return name.NewRegistry(host, name.Insecure)
	}
	return name.NewRegistry(host)
}

// closeIdle drops the idle connections of a view that was replaced.
func (h *hosts) closeIdle() {
	for _, t := range h.transports {
		t.CloseIdleConnections()
	}
}

// newHosts builds the view of conf (nil: no config file).
func newHosts(conf *registryconf.Config, o *options) (*hosts, error) {
	h := &hosts{conf: conf, insecure: map[string]bool{}, tlsHosts: map[string]bool{},
		transports: map[string]*http.Transport{}, base: o.transport}
	for host := range o.insecure {
		h.insecure[host] = true
	}
	if conf == nil {
		return h, nil
	}
	for _, host := range slices.Sorted(maps.Keys(conf.Registries)) {
		c := conf.Registries[host]
		if c.Insecure {
			h.insecure[host] = true
		}
		if c.TLS == nil {
			continue
		}
		base, ok := o.transport.(*http.Transport)
		if !ok {
			return nil, fmt.Errorf("registry %s has TLS settings, which need the store's own HTTP transport, not a %T given with WithTransport", host, o.transport)
		}
		t := base.Clone()
		t.TLSClientConfig = mergeTLS(base.TLSClientConfig, c.TLS)
		h.transports[host] = t
		h.tlsHosts[host] = true
	}
	return h, nil
}

// mergeTLS lays a host's TLS settings over the base transport's.
func mergeTLS(base, host *tls.Config) *tls.Config {
	c := &tls.Config{}
	if base != nil {
		c = base.Clone()
	}
	if host.RootCAs != nil {
		c.RootCAs = host.RootCAs
	}
	if len(host.Certificates) > 0 {
		c.Certificates = host.Certificates
	}
	if host.InsecureSkipVerify {
		c.InsecureSkipVerify = true
	}
	return c
}

// registryConfig keeps the current view of the registry configuration, and
// loads the file again when it changes.
type registryConfig struct {
	path string // "" without a config file
	opts *options

	cur atomic.Pointer[hosts]

	mu     sync.Mutex // serializes checks and reloads
	stamps []fileStamp
	// racy is set while a file changed too recently for its stamp to tell a
	// later write apart (timestamps are coarse): the next check reads the
	// content instead of trusting the stamps.
	racy bool
	// rejected is the stamps of the last invalid version, so that its error
	// is logged once, not at every pull.
	rejected []fileStamp
}

// newRegistryConfig loads the configuration at o.registryConfig, if any.
func newRegistryConfig(o *options) (*registryConfig, error) {
	r := &registryConfig{path: o.registryConfig, opts: o}
	if r.path == "" {
		h, err := newHosts(nil, o)
		if err != nil {
			return nil, err
		}
		r.cur.Store(h)
		return r, nil
	}
	h, stamps, err := r.load()
	if err != nil {
		return nil, fmt.Errorf("registry config %s: %w", r.path, err)
	}
	r.cur.Store(h)
	r.stamps, r.racy = stamps, isRacy(stamps)
	klog.V(2).InfoS("Loaded the registry config", "path", r.path, "registries", len(h.conf.Registries))
	return r, nil
}

// load reads the configuration and builds its view. The stamps are taken
// after the read: a write in between has a fresh mtime, which makes the
// stamps racy, so the next check reads the content again.
func (r *registryConfig) load() (*hosts, []fileStamp, error) {
	conf, err := registryconf.Load(r.path)
	if err != nil {
		return nil, nil, err
	}
	h, err := newHosts(conf, r.opts)
	if err != nil {
		return nil, nil, err
	}
	return h, stampFiles(conf.Files), nil
}

// refresh checks whether the configuration changed, loads it if so, and
// returns the view in force. It costs a stat per file when nothing changed.
func (r *registryConfig) refresh() *hosts {
	if r.path == "" {
		return r.cur.Load()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	cur := r.cur.Load()
	stamps := stampFiles(cur.conf.Files)
	if !r.racy && slices.Equal(stamps, r.stamps) {
		return cur
	}
	if slices.Equal(stamps, r.rejected) && !isRacy(stamps) {
		return cur // the invalid version already reported
	}
	h, newStamps, err := r.load()
	if err != nil {
		if !slices.Equal(stamps, r.rejected) {
			klog.ErrorS(err, "The registry config is invalid; keeping the last good one", "path", r.path)
			r.rejected = stamps
		}
		// The stamps stay those of the good version: the file is checked
		// again at the next pull, and a fixed version is loaded then.
		r.racy = false
		return cur
	}
	r.rejected = nil
	r.stamps, r.racy = newStamps, isRacy(newStamps)
	if h.conf.Digest == cur.conf.Digest {
		return cur // rewritten with the same content
	}
	r.cur.Store(h)
	cur.closeIdle()
	klog.InfoS("Reloaded the registry config", "path", r.path, "registries", len(h.conf.Registries))
	return h
}

// fileStamp is what a stat tells about a file's version.
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // ns
	err          string
}

// stampFiles stats files (following symlinks: a ConfigMap volume swaps a
// symlinked directory to update its files).
func stampFiles(files []string) []fileStamp {
	out := make([]fileStamp, len(files))
	for i, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			out[i].err = err.Error()
			continue
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			out[i] = fileStamp{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
			continue
		}
		out[i] = fileStamp{dev: uint64(st.Dev), ino: st.Ino, size: st.Size,
			mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
	}
	return out
}

// racyWindow is how recent a change must be for its stamp to be distrusted:
// file timestamps tick coarsely (a jiffy, or a second or two on some
// filesystems), so two writes within one tick can leave the same stamp.
const racyWindow = 2 * time.Second

func isRacy(stamps []fileStamp) bool {
	now := time.Now().UnixNano()
	for _, s := range stamps {
		if now-max(s.mtime, s.ctime) < int64(racyWindow) {
			return true
		}
	}
	return false
}

// headerTimeout fails a request whose response headers do not arrive within
// d. It wraps the transport of mirrors only: a mirror that hangs then costs a
// bounded wait before the fallback, not the caller's whole deadline, while a
// large body may take as long as it needs.
type headerTimeout struct {
	next http.RoundTripper
	d    time.Duration
}

var errNoAnswer = errors.New("no answer")

func (t *headerTimeout) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := time.AfterFunc(t.d, func() { cancel(errNoAnswer) })
	resp, err := t.next.RoundTrip(req.WithContext(ctx))
	if !timer.Stop() && err == nil {
		// The timer fired as the answer came: the body's context is gone.
		resp.Body.Close()
		resp, err = nil, context.Cause(ctx)
	}
	if err != nil {
		if errors.Is(context.Cause(ctx), errNoAnswer) {
			err = fmt.Errorf("%w: %s sent no answer within %s", ErrUnavailable, req.URL.Host, t.d)
		}
		cancel(nil)
		return nil, err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	return resp, nil
}

// cancelOnClose releases a request's context when its body is closed.
type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}
