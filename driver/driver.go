package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/commits"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/layercache"
)

// DefaultName is the CSI driver name.
const DefaultName = "strata.csi.dev"

// Mode selects the services a plugin process serves.
type Mode string

// Modes.
const (
	ModeNode       Mode = "node"       // Identity + Node (the DaemonSet)
	ModeController Mode = "controller" // Identity + Controller (the Deployment)
	ModeAll        Mode = "all"        // all three, for tests and single machines
)

// Config configures a Driver.
type Config struct {
	Name    string // CSI driver name (DefaultName)
	Version string // reported by GetPluginInfo
	NodeID  string // required in node mode
	Root    string // node state root; holds the layer cache and volumes/
	Mode    Mode
	// CacheOptions configure the node's layer cache.
	CacheOptions []layercache.Option
	// CacheBudget bounds the cache (MaxBytes 0: unbounded), or
	// CacheMaxPercent of the filesystem that holds Root does.
	CacheBudget     layercache.Budget
	CacheMaxPercent float64
	// Kube reaches the Kubernetes API (events on pods, pull secrets); nil
	// when the plugin runs without one (tests, single machines).
	Kube kubernetes.Interface
	// Dynamic reaches the VolumeCommit custom resources (WatchCommits); nil
	// turns them off.
	Dynamic dynamic.Interface
	// VolumeCommits turns on the VolumeCommit watcher of a node plugin
	// (--volume-commits). Off by default: the watcher reads pods, claims,
	// PersistentVolumes and push secrets of every namespace, which needs
	// RBAC that a cluster without VolumeCommits should not grant.
	VolumeCommits bool
	// CommitAllowedRegistries are the registries (host[:port]) that
	// VolumeCommits may push to (--commit-allowed-registries); empty
	// allows any.
	CommitAllowedRegistries []string
	// CommitNamespaces limits VolumeCommits to those of these namespaces
	// (--commit-namespaces), whose RBAC can then be Roles there; empty:
	// every namespace.
	CommitNamespaces []string
	// PullCredentials configures the sources of pull credentials after the
	// volume's node-publish secret: a service account's imagePullSecrets
	// (read through Kube, which New fills in) and kubelet credential
	// providers.
	PullCredentials credentials.Config
	// DefaultUpperSize caps the writable upper of an inline volume or a
	// static PersistentVolume whose size attribute is not set, in bytes
	// (the plugin's flag defaults to DefaultUpperSize); 0 leaves such
	// uppers uncapped, directories on the state root's filesystem.
	DefaultUpperSize int64
}

// Driver serves the CSI services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	csi.UnimplementedControllerServer

	name, version, nodeID, root string
	mode                        Mode

	store    *layercache.Store  // nil in controller mode
	creds    *credentials.Chain // nil in controller mode
	inflight inflight
	ready    atomic.Bool
	metrics  *metrics.Metrics
	// background tracks work that outlives calls (prepulls).
	background sync.WaitGroup

	controller controllerState

	kube    kubernetes.Interface // nil: no API access
	dynamic dynamic.Interface    // nil: no VolumeCommits
	events  *podEvents           // nil: no API access, or no node service

	// volumeCommits turns the VolumeCommit watcher on; commitAllowed is
	// its allow-list of target registries (empty: any), commitNamespaces
	// the namespaces it watches (empty: all).
	volumeCommits    bool
	commitAllowed    []string
	commitNamespaces []string
	// uppers makes the filesystems of capped writable uppers (nil in
	// controller mode); defaultUpperSize is the cap of a volume without
	// a size attribute, 0 for none.
	uppers           *clonefs.Templates
	defaultUpperSize int64
}

// New validates cfg and opens (in node mode) the layer cache. Call Recover
// before serving.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	switch cfg.Mode {
	case ModeNode, ModeController, ModeAll:
	default:
		return nil, fmt.Errorf("unknown mode %q: use node, controller or all", cfg.Mode)
	}
	if len(cfg.CommitAllowedRegistries) > 0 && !cfg.VolumeCommits {
		return nil, errors.New("--commit-allowed-registries without --volume-commits: VolumeCommits are off, turn them on or drop the allow-list")
	}
	if len(cfg.CommitNamespaces) > 0 && !cfg.VolumeCommits {
		return nil, errors.New("--commit-namespaces without --volume-commits: VolumeCommits are off, turn them on or drop the namespaces")
	}
	if err := commits.CheckAllowedRegistries(cfg.CommitAllowedRegistries); err != nil {
		return nil, err
	}
	if err := commits.CheckNamespaces(cfg.CommitNamespaces); err != nil {
		return nil, err
	}
	d := &Driver{name: cfg.Name, version: cfg.Version, nodeID: cfg.NodeID, mode: cfg.Mode, kube: cfg.Kube, dynamic: cfg.Dynamic,
		volumeCommits: cfg.VolumeCommits, commitAllowed: cfg.CommitAllowedRegistries, commitNamespaces: cfg.CommitNamespaces}
	if !d.serves(ModeNode) {
		d.metrics = metrics.New(metrics.Sources{})
		return d, nil
	}
	if cfg.NodeID == "" {
		return nil, errors.New("node mode needs a node id (--node-id, usually the Kubernetes node name)")
	}
	if cfg.Root == "" {
		return nil, errors.New("node mode needs a state root (--root)")
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	d.root = root
	if err := os.MkdirAll(filepath.Join(root, "volumes"), 0o700); err != nil {
		return nil, fmt.Errorf("create state root: %w", err)
	}
	budget, err := cacheBudget(cfg.CacheBudget, cfg.CacheMaxPercent, root)
	if err != nil {
		return nil, err
	}
	if err := d.openUppers(root, cfg.DefaultUpperSize); err != nil {
		return nil, err
	}
	credCfg := cfg.PullCredentials
	credCfg.Kube = cfg.Kube
	if d.creds, err = credentials.New(credCfg); err != nil {
		return nil, err
	}
	opts := append(cfg.CacheOptions, layercache.WithBudget(budget))
	if d.store, err = layercache.Open(root, opts...); err != nil {
		d.creds.Close()
		return nil, fmt.Errorf("open layer cache in %s: %w", root, err)
	}
	d.events = newPodEvents(cfg.Kube, d.name, d.nodeID)
	d.metrics = metrics.New(metrics.Sources{
		Usage: d.store.Usage,
		Stats: d.store.Stats,
		Volumes: func() (int, error) {
			recs, err := d.records()
			return len(recs), err
		},
	})
	return d, nil
}

// WatchCommits carries out, in the background until ctx ends, the
// VolumeCommits that name volumes of this node (package driver/commits).
// It does nothing unless VolumeCommits are on, nor without API access or
// outside node mode.
func (d *Driver) WatchCommits(ctx context.Context) error {
	if !d.volumeCommits || !d.serves(ModeNode) {
		return nil
	}
	if d.kube == nil || d.dynamic == nil {
		klog.InfoS("No Kubernetes API access: VolumeCommits are not watched")
		return nil
	}
	w, err := commits.New(commits.Config{Kube: d.kube, Dynamic: d.dynamic, NodeID: d.nodeID, DriverName: d.name,
		Root: d.root, Store: d.store, Credentials: d.creds, AllowedRegistries: d.commitAllowed,
		Namespaces: d.commitNamespaces})
	if err != nil {
		return err
	}
	d.background.Go(func() { w.Run(ctx) })
	return nil
}

// MetricsHandler serves the plugin's Prometheus metrics.
func (d *Driver) MetricsHandler() http.Handler { return d.metrics.Handler() }

// serves reports whether the driver serves the services of mode m.
func (d *Driver) serves(m Mode) bool { return d.mode == ModeAll || d.mode == m }

// Close waits for background work (whose context the caller has ended),
// stops the event recorder (events not yet sent are lost) and releases the
// layer cache. Published volumes stay mounted.
func (d *Driver) Close() error {
	d.background.Wait()
	d.events.shutdown()
	d.creds.Close()
	if d.store != nil {
		return d.store.Close()
	}
	return nil
}

// Serve listens on endpoint (unix:///path/csi.sock) until ctx ends, then
// stops gracefully. A stale socket file from an earlier run is removed. A
// node plugin with API access also sweeps, until ctx ends, the clones of
// deleted PersistentVolumes.
func (d *Driver) Serve(ctx context.Context, endpoint string) error {
	sock, err := SocketPath(endpoint)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
		return err
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.intercept))
	csi.RegisterIdentityServer(srv, d)
	if d.serves(ModeNode) {
		csi.RegisterNodeServer(srv, d)
	}
	if d.serves(ModeController) {
		csi.RegisterControllerServer(srv, d)
	}
	klog.InfoS("Serving CSI", "endpoint", endpoint, "driver", d.name, "mode", d.mode, "nodeID", d.nodeID, "version", d.version)
	if d.kube != nil && d.store != nil {
		// Clones whose PersistentVolume is deleted are removed by their
		// node (see sweep.go); Close waits for the sweeper, which ends
		// with ctx.
		d.background.Go(func() { d.runCloneSweeper(ctx) })
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		klog.InfoS("Stopping: published volumes stay mounted")
		srv.GracefulStop()
		return nil
	}
}

// SocketPath returns the socket path of a CSI endpoint given as
// unix:///abs/path, unix://rel/path or a plain path.
func SocketPath(endpoint string) (string, error) {
	if endpoint == "" {
		return "", errors.New("empty CSI endpoint")
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme == "" {
		return endpoint, nil // a plain path
	}
	if u.Scheme != "unix" || (u.Path == "" && u.Host == "") {
		return "", fmt.Errorf("endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	if u.Host != "" {
		return filepath.Join(u.Host, u.Path), nil
	}
	return u.Path, nil
}

// intercept logs every call (secrets stripped) at V(4) and every error, maps
// errors to gRPC status codes for handlers that returned plain errors, and
// records each call's latency and code.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	klog.V(4).InfoS("CSI call", "method", info.FullMethod, "request", sanitize(req))
	start := time.Now()
	resp, err := handler(ctx, req)
	err = toStatus(err)
	d.metrics.ObserveCall(path.Base(info.FullMethod), status.Code(err), time.Since(start))
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod, "request", sanitize(req))
		return nil, err
	}
	klog.V(5).InfoS("CSI call done", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp))
	return resp, nil
}

// sanitize is a request as it may be logged: the fields the CSI spec marks
// secret stripped (protosanitizer), and the pod's ServiceAccount tokens in
// the volume context too, which the spec does not mark: kubelet puts them
// there (the CSIDriver's tokenRequests), and they are credentials.
func sanitize(req any) fmt.Stringer {
	if r, ok := req.(*csi.NodePublishVolumeRequest); ok {
		if _, has := r.GetVolumeContext()[attrTokens]; has {
			c := proto.Clone(r).(*csi.NodePublishVolumeRequest)
			c.VolumeContext[attrTokens] = redacted
			req = c
		}
	}
	return protosanitizer.StripSecrets(req)
}

// redacted replaces a credential in logs, as protosanitizer writes it.
const redacted = "***stripped***"
