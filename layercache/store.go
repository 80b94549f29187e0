package layercache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
)

// DefaultConcurrency is the default number of layers fetched and unpacked at
// once. Unpacking is CPU-bound (decompression, hashing) and disk-bound; on a
// 2-core node three streams keep both cores busy while one waits on I/O.
const DefaultConcurrency = 3

// Store is a node's layer cache rooted at one directory. It is safe for
// concurrent use by many goroutines, and by several processes that open the
// same root.
type Store struct {
	root string
	opts options

	// work is this process's private directory under tmp/, held with an
	// flock so that another process's Open does not remove it.
	work     string
	workLock *fileLock

	sem chan struct{} // bounds concurrent layer fetches

	// ctx outlives callers: shared layer fetches run on it, so a caller
	// whose context is cancelled does not cancel the work of the others.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// reg is the registry configuration in force: mirrors, plain-HTTP
	// hosts, per-host TLS. It is reloaded when its file changes.
	reg *registryConfig

	mu      sync.Mutex
	flights map[string]*flight // in-progress layer fetches by flightKey
	// resolving are the resolutions at a registry in flight, by resolveKey.
	resolving map[string]*resolving
	// clients are the connected registry clients that callers with the
	// same credentials share for a while (clientFor).
	clients map[string]*sharedClient
	// accessMu orders this process's updates of layer access records;
	// accessCache keeps the records read, by diffID (readLayerAccess).
	accessMu    sync.Mutex
	accessCache sync.Map

	// lockMu orders this process's takers of the store lock before they
	// queue on the flock. flock is not fair: a prune that releases and at
	// once re-takes the lock for its next batch could keep an Acquire
	// waiting for many batches. A sync.Mutex hands itself to a waiter that
	// has waited over a millisecond, so a publish waits for one batch at
	// most.
	lockMu sync.Mutex

	// built caches the Image each manifest or index digest describes for
	// this store's platform (*Image by v1.Hash); digests are immutable.
	built sync.Map

	evictedLayers, evictedBytes atomic.Int64 // by budget, since Open

	// res is the budget that unpacks in progress hold (see reserve).
	res reservation

	// limits holds the waits that rate-limiting hosts asked for, and
	// counts their 429s.
	limits *rateLimits
}

// Stats are counters of this Store since Open, for metrics.
type Stats struct {
	// InFlight is the number of layers being fetched now.
	InFlight int
	// EvictedLayers and EvictedBytes count what the budget evicted.
	EvictedLayers, EvictedBytes int64
	// RateLimited counts the 429 Too Many Requests answers by host (a
	// registry, mirror or token server), for the first 100 hosts; the
	// rest are counted under OtherHosts.
	RateLimited map[string]int64
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	n := len(s.flights)
	s.mu.Unlock()
	return Stats{InFlight: n, EvictedLayers: s.evictedLayers.Load(), EvictedBytes: s.evictedBytes.Load(),
		RateLimited: s.limits.counted()}
}

type options struct {
	concurrency int
	platform    v1.Platform
	insecure    map[string]bool
	transport   http.RoundTripper
	userAgent   string
	budget      Budget
	limits      Limits

	retryAttempts int
	retryBackoff  time.Duration

	noCredentialCheck bool

	registryConfig string        // WithRegistryConfig; "" for none
	mirrorTimeout  time.Duration // DefaultMirrorTimeout

	ranged ranged // parallel fetch of large raw files
}

// Option configures a Store.
type Option func(*options) error

// WithConcurrency sets how many layers are fetched and unpacked at once
// (default DefaultConcurrency).
func WithConcurrency(n int) Option {
	return func(o *options) error {
		if n < 1 {
			return fmt.Errorf("concurrency must be at least 1, got %d", n)
		}
		o.concurrency = n
		return nil
	}
}

// WithPlatform sets the platform picked from image indexes (default: this
// process's GOOS/GOARCH, falling back to linux/amd64 when an index lacks it).
func WithPlatform(p v1.Platform) Option {
	return func(o *options) error {
		if p.OS == "" || p.Architecture == "" {
			return fmt.Errorf("platform needs an OS and an architecture, got %q", p.String())
		}
		o.platform = p
		return nil
	}
}

// WithInsecureRegistries lists registries ("host" or "host:port") reached
// over plain HTTP. Loopback registries always are; every other registry is
// reached over HTTPS only.
func WithInsecureRegistries(hosts ...string) Option {
	return func(o *options) error {
		for _, h := range hosts {
			if _, err := name.NewRegistry(h); err != nil {
				return fmt.Errorf("insecure registry %q: %w", h, err)
			}
			o.insecure[h] = true
		}
		return nil
	}
}

// WithTransport sets the HTTP transport used to reach registries (default: a
// clone of http.DefaultTransport). Plain HTTP is still refused for
// registries that are neither loopback nor listed as insecure.
func WithTransport(rt http.RoundTripper) Option {
	return func(o *options) error {
		if rt == nil {
			return errors.New("transport must not be nil")
		}
		o.transport = rt
		return nil
	}
}

// WithUserAgent sets the User-Agent sent to registries.
func WithUserAgent(ua string) Option {
	return func(o *options) error {
		o.userAgent = ua
		return nil
	}
}

// Open opens (creating if needed) the store at root, and removes the debris
// that a crashed process left in tmp/.
func Open(root string, opts ...Option) (*Store, error) {
	o := options{
		concurrency: DefaultConcurrency,
		platform:    v1.Platform{OS: "linux", Architecture: runtime.GOARCH},
		insecure:    map[string]bool{},
		limits:      DefaultLimits,
		userAgent:   "strata",

		retryAttempts: DefaultRetryAttempts,
		retryBackoff:  DefaultRetryBackoff,
		mirrorTimeout: DefaultMirrorTimeout,
		ranged:        defaultRanged,
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.transport == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = o.concurrency * 2
		o.transport = t
	}
	if root == "" {
		return nil, errors.New("store root must not be empty")
	}
	reg, err := newRegistryConfig(&o)
	if err != nil {
		return nil, err
	}
	root, err = filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	// The root is private: unpacked layers keep their setuid bits, and must
	// not be a way for a host user to run an image's setuid binary.
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create store root: %w", err)
	}
	for _, d := range []string{layersDir, imagesDir, imageRefDir, accessDir, refsDir, tmpDir, partialDir} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("create store directory: %w", err)
		}
	}
	s := &Store{root: root, opts: o, reg: reg, sem: make(chan struct{}, o.concurrency), flights: map[string]*flight{},
		resolving: map[string]*resolving{}, clients: map[string]*sharedClient{}, limits: newRateLimits()}
	s.res.committed = -1
	if err := s.claimWork(); err != nil {
		return nil, err
	}
	if err := s.sweepPartials(partialMaxAge); err != nil {
		return nil, fmt.Errorf("remove stale partial downloads: %w", err)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Root returns the store's root directory.
func (s *Store) Root() string { return s.root }

// Close waits for in-flight layer fetches to stop and releases the store.
func (s *Store) Close() error {
	s.cancel()
	s.wg.Wait()
	err := os.RemoveAll(s.work)
	s.workLock.unlock()
	return err
}

// claimWork removes the work directories of dead processes from tmp/ and
// creates this process's own. It runs under the store lock, so that no other
// process sees a work directory between its creation and its flock.
func (s *Store) claimWork() error {
	l, err := s.lock()
	if err != nil {
		return err
	}
	defer l.unlock()
	tmp := filepath.Join(s.root, tmpDir)
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := filepath.Join(tmp, e.Name())
		if e.IsDir() {
			if live, err := isLocked(p); err != nil || live {
				continue
			}
		}
		klog.V(2).InfoS("Removing debris of an interrupted operation", "path", p)
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("remove debris %s: %w", p, err)
		}
	}
	work, err := os.MkdirTemp(tmp, "w-")
	if err != nil {
		return err
	}
	wl, err := lockPath(work, true)
	if err != nil {
		return err
	}
	s.work, s.workLock = work, wl
	return nil
}

// isLocked reports whether a live process holds the flock on dir.
func isLocked(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, err
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == unix.EWOULDBLOCK {
		return true, nil
	}
	return false, err
}

// lock takes the store-wide lock that orders reference changes against
// prunes, within this process and across processes.
func (s *Store) lock() (*fileLock, error) {
	s.lockMu.Lock()
	l, err := lockPath(filepath.Join(s.root, lockFile), true)
	if err != nil {
		s.lockMu.Unlock()
		return nil, err
	}
	l.mu = &s.lockMu
	return l, nil
}

// writeAtomic replaces a state file so that a reader, or a process started
// after a crash of this one at any instant, sees either the old content or
// all of data, staging it in the work directory so that a crash leaves
// debris only under tmp/.
//
// Nothing is fsynced: a process crash loses nothing that reached the page
// cache, and what a power failure loses or tears is a reference or record of
// a mount that the power failure took with it. readJSON treats a torn file
// as absent. (Layers, which are content, are made durable before they are
// committed: see fetchLayer.) An fsync here would double a publish's cost.
func (s *Store) writeAtomic(path string, data []byte) error {
	return atomicfile.Write(path, data, 0o644, atomicfile.Options{TempDir: s.work})
}
