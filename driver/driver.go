package driver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/capacity"
	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/driver/commits"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/driver/tasks"
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

// Driver serves the CSI services: a thin front over the volume engine
// (package engine), the persistent clones (package clones) and, in the
// controller, the provisioning of volumes (controller.go). Each handler
// validates its request, takes the lock of its volume, calls the engine
// and returns; the interceptor turns errors into gRPC codes (errors.go).
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	csi.UnimplementedControllerServer

	cfg   Config
	name  string
	mode  Mode
	ready atomic.Bool

	store   *layercache.Store  // nil in controller mode
	creds   *credentials.Chain // nil in controller mode
	engine  *engine.Engine     // nil in controller mode
	clones  *clones.Clones     // nil in controller mode
	locks   engine.Locks
	metrics *metrics.Metrics
	// tasks runs the background work: the clone sweep, prepulls, the
	// VolumeCommit watcher and the storage capacity.
	tasks *tasks.Runner
	// cacheMax is the node's cache budget in bytes (0: unbounded), which
	// the room of clones leaves to the cache.
	cacheMax int64
	// capacity publishes the node's room (nil: not published); capReader
	// reads what the nodes published, for GetCapacity (nil: not read).
	capacity  *capacity.Publisher
	capReader *capacity.Reader

	controller controllerState
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
	d := &Driver{cfg: cfg, name: cfg.Name, mode: cfg.Mode, tasks: tasks.New(context.Background())}
	if d.serves(ModeController) && cfg.Kube != nil && cfg.CapacityNamespace != "" {
		d.capReader = capacity.NewReader(cfg.Kube, cfg.CapacityNamespace, d.name, TopologyKey)
	}
	if !d.serves(ModeNode) {
		d.metrics = metrics.New(metrics.Sources{})
		return d, nil
	}
	if err := d.openNode(); err != nil {
		return nil, err
	}
	return d, nil
}

// openNode opens what the node service needs: the layer cache, the
// credential chain, the volume engine and the clones.
func (d *Driver) openNode() error {
	cfg := &d.cfg
	if cfg.NodeID == "" {
		return errors.New("node mode needs a node id (--node-id, usually the Kubernetes node name)")
	}
	if cfg.Root == "" {
		return errors.New("node mode needs a state root (--root)")
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return err
	}
	cfg.Root = root
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("create state root: %w", err)
	}
	budget, err := layercache.BudgetOf(cfg.CacheBudget, cfg.CacheMaxPercent, root)
	if err != nil {
		return err
	}
	credCfg := cfg.PullCredentials
	credCfg.Kube = cfg.Kube
	if d.creds, err = credentials.New(credCfg); err != nil {
		return err
	}
	opts := append(cfg.CacheOptions, layercache.WithBudget(budget))
	if d.store, err = layercache.Open(root, opts...); err != nil {
		d.creds.Close()
		return fmt.Errorf("open layer cache in %s: %w", root, err)
	}
	d.metrics = metrics.New(metrics.Sources{Usage: d.store.Usage, Stats: d.store.Stats,
		Volumes: func() (int, error) { return d.engine.Volumes() }})
	d.engine, err = engine.New(engine.Config{Root: root, DriverName: d.name, NodeID: cfg.NodeID, Store: d.store, Credentials: d.creds,
		Metrics: d.metrics, Kube: cfg.Kube, DefaultUpperSize: cfg.DefaultUpperSize})
	if err != nil {
		d.store.Close()
		d.creds.Close()
		return err
	}
	d.clones = clones.New(d.engine, &d.locks, cfg.NodeID, d.name)
	d.cacheMax = budget.MaxBytes
	if cfg.Kube != nil && cfg.CapacityNamespace != "" {
		// A node whose room cannot be published still serves its volumes:
		// the scheduler then places no clone here.
		p, err := capacity.NewPublisher(capacity.Config{Kube: cfg.Kube, DriverName: d.name, NodeID: cfg.NodeID,
			TopologyKey: TopologyKey, Namespace: cfg.CapacityNamespace, Measure: d.measureRoom, Interval: cfg.CapacityInterval})
		if err != nil {
			klog.ErrorS(err, "This node's storage capacity is not published: the scheduler places no persistent clone here")
		} else {
			d.capacity = p
			d.clones.SetOnChange(p.Refresh)
		}
	}
	return nil
}

// measureRoom measures the room of a new clone on this node, leaving the
// layer cache what its budget may still take.
func (d *Driver) measureRoom() (capacity.Room, error) {
	var reserve int64
	if d.cacheMax > 0 {
		u, err := d.store.Usage()
		if err != nil {
			return capacity.Room{}, fmt.Errorf("measure the room for clones: layer cache usage: %w", err)
		}
		reserve = d.cacheMax - u.Bytes
	}
	return capacity.Measure(d.cfg.Root, reserve)
}

// Recover rebuilds the node's state from disk after a start (engine's
// Recover). The plugin reports ready only after it.
func (d *Driver) Recover() error {
	if d.engine != nil {
		if err := d.engine.Recover(d.cfg.Prepull); err != nil {
			return err
		}
	}
	d.ready.Store(true)
	return nil
}

// Start runs the plugin's background tasks until Close: the prepulls of
// Config.Prepull, the sweep of the clones of deleted PersistentVolumes and
// the node's storage capacity (with API access) and, when VolumeCommits are
// on, their watcher; in the controller, the reader of the nodes' storage
// capacity.
func (d *Driver) Start() error {
	if d.capReader != nil {
		d.tasks.Go("storage-capacity-reader", d.capReader.Run)
	}
	if d.engine == nil {
		return nil
	}
	// A copy for a clone of a claim freezes its source: one that a kill
	// interrupted left it frozen.
	d.clones.ThawAll(context.Background())
	for _, ref := range d.cfg.Prepull {
		d.tasks.Go("prepull", func(ctx context.Context) { d.engine.Prepull(ctx, ref) })
	}
	if d.cfg.Kube == nil {
		klog.InfoS("No Kubernetes API access: the clones of deleted volumes are not swept, VolumeCommits are not watched")
		return nil
	}
	d.tasks.Go("clone-sweeper", func(ctx context.Context) { d.clones.RunSweeper(ctx, d.cfg.Kube) })
	if d.capacity != nil {
		d.tasks.Go("storage-capacity", d.capacity.Run)
	} else {
		klog.InfoS("No --capacity-namespace: this node's storage capacity is not published")
	}
	if !d.cfg.VolumeCommits {
		return nil
	}
	if d.cfg.Dynamic == nil {
		klog.InfoS("No access to custom resources: VolumeCommits are not watched")
		return nil
	}
	w, err := commits.New(commits.Config{Kube: d.cfg.Kube, Dynamic: d.cfg.Dynamic, NodeID: d.cfg.NodeID, DriverName: d.name,
		Root: d.cfg.Root, Store: d.store, Credentials: d.creds, AllowedRegistries: d.cfg.CommitAllowedRegistries,
		Namespaces: d.cfg.CommitNamespaces})
	if err != nil {
		return err
	}
	d.tasks.Go("volume-commits", w.Run)
	return nil
}

// MetricsHandler serves the plugin's Prometheus metrics.
func (d *Driver) MetricsHandler() http.Handler { return d.metrics.Handler() }

// serves reports whether the driver serves the services of mode m.
func (d *Driver) serves(m Mode) bool { return d.mode == ModeAll || d.mode == m }

// Close stops the background tasks and waits for them, stops the event
// recorder (events not yet sent are lost) and releases the layer cache.
// Published volumes stay mounted.
func (d *Driver) Close() error {
	d.tasks.Stop()
	if d.engine == nil {
		return nil
	}
	d.engine.Close()
	d.creds.Close()
	return d.store.Close()
}
