// Package engine is Strata's volume engine: it publishes an image's layer
// stack at a pod's target path and undoes it. It parses the volume
// attributes (the user-facing contract) and the pod of a publish, plans and
// resolves the stack, has the layer cache fetch and reference its layers,
// mounts the overlay (with a private writable upper, capped in a filesystem
// of its own, or none when read-only), binds a subPath or a staged clone,
// reports usage and health, and rebuilds its state after a restart
// (Recover). It returns domain errors (the sentinels in errors.go, and
// layercache's), never gRPC codes: the CSI front translates them.
//
// The publish path reads top to bottom in publish.go: Publish checks the
// request against what is on disk, publish resolves the stack (stack.go),
// writes the record (package state) before anything it describes exists,
// fetches and references the layers (package layercache) and mounts
// (package mount).
package engine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/client-go/kubernetes"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
)

// Config configures an Engine.
type Config struct {
	// Root is the node state root; it holds the layer cache, volumes/ and
	// clones/.
	Root string
	// DriverName and NodeID are the events' source.
	DriverName, NodeID string
	// Store is the node's layer cache; Credentials picks each image's
	// pull credentials.
	Store       *layercache.Store
	Credentials *credentials.Chain
	// Metrics records pulls and cache hits (nil: off).
	Metrics *metrics.Metrics
	// Kube records the pulls as events on pods (nil: no events).
	Kube kubernetes.Interface
	// DefaultUpperSize caps the writable upper of a publish without a size
	// attribute, in bytes; 0 leaves such uppers uncapped.
	DefaultUpperSize int64
}

// Engine publishes and unpublishes volumes on one node. It is safe for
// concurrent use, provided no two calls work on the same publish at once
// (the caller holds its Lock).
type Engine struct {
	root    string
	name    string // the CSI driver's, for messages
	store   *layercache.Store
	creds   *credentials.Chain
	metrics *metrics.Metrics
	events  *podEvents // nil: no API access
	// uppers makes the filesystems of capped writable uppers;
	// defaultUpperSize is the cap of a publish without a size attribute, 0
	// for none.
	uppers           *clonefs.Templates
	defaultUpperSize int64
}

// New makes the state root's volumes directory and prepares capped uppers
// (see upper.go).
func New(cfg Config) (*Engine, error) {
	if cfg.Store == nil || cfg.Credentials == nil || cfg.Root == "" {
		return nil, errors.New("engine: a root, a layer cache and a credential chain are required")
	}
	if err := os.MkdirAll(filepath.Join(cfg.Root, state.Dir), 0o700); err != nil {
		return nil, fmt.Errorf("create state root: %w", err)
	}
	e := &Engine{root: cfg.Root, name: cfg.DriverName, store: cfg.Store, creds: cfg.Credentials, metrics: cfg.Metrics}
	if err := e.openUppers(cfg.DefaultUpperSize); err != nil {
		return nil, err
	}
	e.events = newPodEvents(cfg.Kube, cfg.DriverName, cfg.NodeID)
	return e, nil
}

// Close stops the event recorder: events not yet sent are lost.
func (e *Engine) Close() { e.events.shutdown() }

// Root is the node state root.
func (e *Engine) Root() string { return e.root }

// Store is the node's layer cache.
func (e *Engine) Store() *layercache.Store { return e.store }

// Volumes counts the publishes on this node, for the metrics.
func (e *Engine) Volumes() (int, error) {
	vols, err := state.List(e.root)
	return len(vols), err
}
