package provisioner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

// Leader election timing: client-go's usual values (those of
// kube-controller-manager and the library's own defaults). A new leader
// takes over within LeaseDuration of a crash, at once after a clean stop,
// which releases the lease.
const (
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// RunConfig configures Run.
type RunConfig struct {
	// LeaderElection runs the controller only while this process holds the
	// Lease named after the driver (as csi-provisioner names it, so that
	// the two never provision side by side): one active replica at a time.
	LeaderElection bool
	// Namespace holds the Lease; empty: the pod's own namespace
	// ($POD_NAMESPACE, else its service account's namespace file).
	Namespace string
	// Identity names this process in the Lease; empty: the host name (the
	// pod's name) and a random suffix.
	Identity string
	// Resizer, if set, runs beside the provisioner, under the same
	// leadership: the claims of the driver's volumes grow in-process
	// (external-resizer's duty).
	Resizer *Resizer
}

// Run runs the library's ProvisionController for p (and cfg.Resizer) until
// ctx ends, with
// the library's default retries and backoff, then waits for the operations
// in flight to finish and, with leader election, releases the Lease. It
// returns an error when leadership is lost while ctx still runs: the caller
// should exit, so that a restart competes again.
func Run(ctx context.Context, kube kubernetes.Interface, p *Provisioner, cfg RunConfig) error {
	if kube == nil {
		return errors.New("the provisioner needs the Kubernetes API: run it in a pod or give --kubeconfig")
	}
	logger := klog.FromContext(ctx).WithValues("provisioner", p.driver)
	ctx = klog.NewContext(ctx, logger)
	run := func(ctx context.Context) {
		var workers sync.WaitGroup
		pc := controller.NewProvisionController(ctx, kube, p.driver, p,
			// Leader election is ours (below): the library's own exits
			// the process when the lease ends, a clean stop included.
			controller.LeaderElection(false),
		)
		pc.ControllerWaitGroup(&workers)
		if cfg.Resizer != nil {
			workers.Go(func() { cfg.Resizer.Run(ctx) })
		}
		logger.Info("Provisioning PersistentVolumes for StorageClasses with this provisioner")
		pc.Run(ctx) // returns when ctx ends
		workers.Wait()
		logger.Info("Provisioner stopped")
	}
	if !cfg.LeaderElection {
		run(ctx)
		return nil
	}
	if cfg.Namespace == "" {
		cfg.Namespace = podNamespace()
	}
	if cfg.Namespace == "" {
		return errors.New("leader election needs the namespace of its Lease: give --leader-election-namespace (outside a pod there is no namespace of its own)")
	}
	id := cfg.Identity
	if id == "" {
		host, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("leader election identity: %w", err)
		}
		id = host + "_" + string(uuid.NewUUID())
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: LeaseName(p.driver), Namespace: cfg.Namespace},
		Client:     kube.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: id},
	}
	var (
		started = make(chan struct{})
		stopped = make(chan struct{})
	)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   DefaultLeaseDuration,
		RenewDeadline:   DefaultRenewDeadline,
		RetryPeriod:     DefaultRetryPeriod,
		ReleaseOnCancel: true,
		Name:            p.driver,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				close(started)
				defer close(stopped)
				logger.Info("Became the leader", "lease", cfg.Namespace+"/"+lock.LeaseMeta.Name, "identity", id)
				run(ctx)
			},
			OnStoppedLeading: func() {},
			OnNewLeader: func(identity string) {
				if identity != id {
					logger.Info("Another replica leads: standing by", "leader", identity)
				}
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	logger.Info("Waiting for the leader election lease", "lease", cfg.Namespace+"/"+lock.LeaseMeta.Name, "identity", id)
	le.Run(ctx) // returns when ctx ends or the lease is lost; it cancels run's context
	select {
	case <-started:
		<-stopped
	default:
	}
	if ctx.Err() == nil {
		return errors.New("lost the provisioner's leader election lease: exiting, so that a restart competes for it again")
	}
	return nil
}

// serviceAccountNamespace is where kubelet mounts the pod's namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// podNamespace is the namespace of the pod the process runs in; empty
// outside a pod.
func podNamespace() string {
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns
	}
	if b, err := os.ReadFile(serviceAccountNamespace); err == nil {
		return strings.TrimSpace(string(b))
	}
	return ""
}

// nonName matches what may not appear in a Lease name.
var nonName = regexp.MustCompile(`[^a-zA-Z0-9-]`)

// LeaseName is the leader election Lease of a driver's provisioner:
// csi-provisioner's name for it (strata.csi.dev: strata-csi-dev).
func LeaseName(driver string) string {
	name := nonName.ReplaceAllString(driver, "-")
	if strings.HasSuffix(name, "-") {
		name += "X"
	}
	return name
}
