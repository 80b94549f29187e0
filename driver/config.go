package driver

import (
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/layercache"
)

// Config configures a Driver.
type Config struct {
	Name    string // CSI driver name (DefaultName)
	Version string // reported by GetPluginInfo
	NodeID  string // required in node mode
	Root    string // node state root; holds the layer cache, volumes/ and clones/
	Mode    Mode
	// CacheOptions configure the node's layer cache.
	CacheOptions []layercache.Option
	// CacheBudget bounds the cache (MaxBytes 0: unbounded), or
	// CacheMaxPercent of the filesystem that holds Root does.
	CacheBudget     layercache.Budget
	CacheMaxPercent float64
	// Kube reaches the Kubernetes API (events on pods, pull secrets, the
	// clone sweep); nil when the plugin runs without one (tests, single
	// machines).
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
	// (the plugin's flag defaults to engine.DefaultUpperSize); 0 leaves
	// such uppers uncapped, directories on the state root's filesystem.
	DefaultUpperSize int64
	// Prepull lists the images the node keeps pulled (--prepull): Recover
	// keeps their layers, Prepull pulls them.
	Prepull []string
	// CapacityNamespace is the namespace of the CSIStorageCapacity objects
	// (--capacity-namespace, the driver's own): with API access, a node
	// plugin publishes its node's room for clones there, and the
	// controller's GetCapacity reads them. Empty: none are published, and
	// the controller knows the room of no node but its own (--mode=all).
	CapacityNamespace string
	// CapacityInterval is how often a node measures and publishes its room
	// besides after each clone's stage and removal (--capacity-poll-interval;
	// 0: capacity.DefaultInterval).
	CapacityInterval time.Duration
}
