package commits

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/layercache/commit"
)

// Event reasons on a VolumeCommit.
const (
	ReasonCommitting   = "Committing"
	ReasonCommitted    = "Committed"
	ReasonCommitFailed = "CommitFailed"
)

// Defaults, each with its reason.
const (
	// DefaultResync: how often every VolumeCommit is looked at again, which
	// is how a Pending one notices that its pod was scheduled or its claim
	// bound. Pods and claims are not watched: one GET per Pending commit a
	// minute costs less than a node-wide watch of every pod.
	DefaultResync = time.Minute
	// DefaultAPIWait: how often the watcher checks that the VolumeCommit
	// API is there (the CRD installed, the RBAC granted) before it watches.
	DefaultAPIWait = time.Minute
)

// Credentials finds the credentials for an image (driver/credentials.Chain).
type Credentials interface {
	For(ctx context.Context, ref string, secrets map[string]string, pod credentials.Pod) (credentials.Pull, error)
}

var _ Credentials = (*credentials.Chain)(nil)

// Config configures a Watcher.
type Config struct {
	// Kube reads pods, claims, volumes and push secrets, and records
	// events; Dynamic reads and updates VolumeCommits. Both required.
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
	// NodeID is this node's name, DriverName the CSI driver's, Root the node
	// state root.
	NodeID, DriverName, Root string
	// Store is the node's layer cache: its work directory holds the layer
	// being built, and it reaches registries as pulls do.
	Store *layercache.Store
	// Credentials are the driver's own credential sources, asked after the
	// VolumeCommit's push secret to read the base image, never for the
	// push.
	Credentials Credentials
	// Resync and APIWait: DefaultResync and DefaultAPIWait if zero.
	Resync, APIWait time.Duration
	// AllowedRegistries are the registries (host[:port]) that commits may
	// push to (--commit-allowed-registries); empty allows any. A commit to
	// another registry is refused. Matched exactly against the target's
	// registry as go-containerregistry names it (docker.io is
	// index.docker.io), never by prefix.
	AllowedRegistries []string
	// Namespaces limits the watch to the VolumeCommits of these namespaces
	// (--commit-namespaces), so that the plugin's RBAC for them can be
	// Roles in those namespaces instead of ClusterRoles; empty: all.
	Namespaces []string
}

// Watcher carries out the VolumeCommits of this node's volumes.
type Watcher struct {
	cfg    Config
	loc    *locator
	queue  workqueue.TypedRateLimitingInterface[string]
	events record.EventRecorder
	now    func() time.Time

	// secretOnly is a credential chain of no sources but the request's
	// secrets: it finds the push secret's entry for the target, and nothing
	// of the driver's.
	secretOnly Credentials
	// allowed holds the registries of AllowedRegistries as
	// go-containerregistry names them, lower case; nil allows any.
	allowed map[string]bool

	mu      sync.Mutex
	running map[string]bool // keys being committed by this process
	// unwritten holds the final status of commits done whose status
	// update failed, by object UID: a retry writes it, and does not commit
	// again.
	unwritten map[types.UID]Status
}

// New checks cfg and returns a Watcher; Run starts it.
func New(cfg Config) (*Watcher, error) {
	switch {
	case cfg.Kube == nil || cfg.Dynamic == nil:
		return nil, errors.New("VolumeCommits need Kubernetes API access")
	case cfg.NodeID == "" || cfg.DriverName == "" || cfg.Root == "":
		return nil, errors.New("VolumeCommits need the node id, the driver name and the state root")
	case cfg.Store == nil || cfg.Credentials == nil:
		return nil, errors.New("VolumeCommits need the layer cache and the credential chain")
	}
	if cfg.Resync == 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.APIWait == 0 {
		cfg.APIWait = DefaultAPIWait
	}
	allowed, err := allowList(cfg.AllowedRegistries)
	if err != nil {
		return nil, err
	}
	if err := CheckNamespaces(cfg.Namespaces); err != nil {
		return nil, err
	}
	secretOnly, err := credentials.New(credentials.Config{})
	if err != nil {
		return nil, err
	}
	return &Watcher{
		cfg:        cfg,
		loc:        &locator{kube: cfg.Kube, root: cfg.Root, node: cfg.NodeID, driver: cfg.DriverName},
		queue:      workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
		now:        time.Now,
		running:    map[string]bool{},
		unwritten:  map[types.UID]Status{},
		secretOnly: secretOnly,
		allowed:    allowed,
	}, nil
}

// Run watches VolumeCommits and carries out this node's, one at a time,
// until ctx ends. A commit cut short by the end of ctx stays Running, and
// is done again when the plugin starts next.
func (w *Watcher) Run(ctx context.Context) {
	log := klog.FromContext(ctx).WithName("volumecommits")
	ctx = klog.NewContext(ctx, log)
	defer w.queue.ShutDown()
	if !w.waitForAPI(ctx) {
		return
	}
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: w.cfg.Kube.CoreV1().Events("")})
	defer b.Shutdown()
	w.events = b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: w.cfg.DriverName, Host: w.cfg.NodeID})

	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			w.queue.Add(key)
		}
	}
	var synced []cache.InformerSynced
	for _, ns := range w.namespaces() {
		factory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(w.cfg.Dynamic, w.cfg.Resync, ns, nil)
		inf := factory.ForResource(GVR).Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    enqueue,
			UpdateFunc: func(_, obj any) { enqueue(obj) },
		}); err != nil {
			log.Error(err, "Cannot watch VolumeCommits")
			return
		}
		factory.Start(ctx.Done())
		defer factory.Shutdown()
		synced = append(synced, inf.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return
	}
	log.Info("Watching VolumeCommits", "node", w.cfg.NodeID, "namespaces", w.cfg.Namespaces)
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	for w.processNext(ctx) {
	}
}

// namespaces are those whose VolumeCommits are watched; metav1.NamespaceAll
// alone for all.
func (w *Watcher) namespaces() []string {
	if len(w.cfg.Namespaces) == 0 {
		return []string{metav1.NamespaceAll}
	}
	return w.cfg.Namespaces
}

// waitForAPI returns once VolumeCommits can be listed (in each watched
// namespace), checking every APIWait and saying once why not; false if ctx
// ended first.
func (w *Watcher) waitForAPI(ctx context.Context) bool {
	log := klog.FromContext(ctx)
	said := ""
	for {
		var err error
		for _, ns := range w.namespaces() {
			if _, err = w.cfg.Dynamic.Resource(GVR).Namespace(ns).List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
				break
			}
		}
		if err == nil {
			return true
		}
		why := err.Error()
		switch {
		case apierrors.IsNotFound(err):
			why = "the VolumeCommit CRD is not installed (charts/strata/crds/volumecommits.yaml)"
		case apierrors.IsForbidden(err):
			why = "the plugin's ServiceAccount may not list VolumeCommits (the chart's volumecommit RBAC)"
		}
		if why != said {
			log.Info("VolumeCommits are not watched until the API serves them", "reason", why, "retry", w.cfg.APIWait)
			said = why
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(w.cfg.APIWait):
		}
	}
}

// processNext handles one key of the queue; false when the queue shut down.
func (w *Watcher) processNext(ctx context.Context) bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	if err := w.sync(ctx, key); err != nil {
		if ctx.Err() == nil {
			klog.FromContext(ctx).Error(err, "VolumeCommit not handled; retrying", "volumeCommit", key)
			w.queue.AddRateLimited(key)
		}
		return true
	}
	w.queue.Forget(key)
	return true
}

// sync takes the VolumeCommit key if it is this node's to do, and does it.
// An error is an API error: the key is retried.
func (w *Watcher) sync(ctx context.Context, key string) error {
	ns, nm, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	client := w.cfg.Dynamic.Resource(GVR).Namespace(ns)
	// Read the object itself, not the informer's copy, which may lag behind
	// a status this node wrote a moment ago.
	u, err := client.Get(ctx, nm, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get VolumeCommit %s: %w", key, err)
	}
	vc, err := fromUnstructured(u)
	if err != nil {
		return nil // the CRD's schema forbids this; nothing to retry
	}
	log := klog.FromContext(ctx).WithValues("volumeCommit", key, "image", vc.Spec.Image)
	ctx = klog.NewContext(ctx, log)
	act := next(vc.Status, w.cfg.NodeID, w.isRunning(key))
	if act == actSkip {
		return nil
	}
	if final, ok := w.takeUnwritten(u.GetUID()); ok && act == actResume {
		return w.writeFinal(ctx, client, u, final)
	}
	var loc located
	if why := w.disallowed(vc.Spec.Image); why != "" {
		// Every node can tell; the first to write wins.
		loc = refuse("%s", why)
	} else if loc, err = w.loc.locate(ctx, vc); err != nil {
		return err
	}
	log.V(4).Info("Located the VolumeCommit's volume", "action", act, "verdict", loc.verdict, "reason", loc.why)
	switch {
	case loc.verdict == notHere && act == actResume:
		// This node took it and the volume has gone since (the pod ended
		// while the plugin was down).
		loc = refuse("%s; it was taken by node %s, which restarted before it was done", loc.why, w.cfg.NodeID)
	case loc.verdict == notHere:
		return nil
	}
	if loc.verdict == refused {
		st := failed(vc.Status, w.cfg.NodeID, errors.New(loc.why), w.now())
		if err := w.writeStatus(ctx, client, u, st); err != nil {
			return ignoreConflict(err)
		}
		log.Info("VolumeCommit refused", "reason", loc.why)
		w.event(vc, corev1.EventTypeWarning, ReasonCommitFailed, st.Message)
		return nil
	}

	st := vc.Status
	if act == actClaim {
		st = claimed(vc.Status, w.cfg.NodeID, loc.what, w.now())
		if err := w.writeStatus(ctx, client, u, st); err != nil {
			// A conflict: another node took it, or the object changed; the
			// informer brings the new version.
			return ignoreConflict(err)
		}
	} else {
		log.Info("Resuming a VolumeCommit this node left Running")
	}
	w.setRunning(key, true)
	defer w.setRunning(key, false)
	w.event(vc, corev1.EventTypeNormal, ReasonCommitting, fmt.Sprintf("Committing %s to %s on node %s", loc.what, vc.Spec.Image, w.cfg.NodeID))
	log.Info("Committing", "volumeID", loc.src.VolumeID, "what", loc.what)

	res, err := w.commit(ctx, vc, loc.src)
	if ctx.Err() != nil {
		// The plugin is stopping: leave it Running, to be done again at
		// the next start.
		return nil
	}
	var final Status
	if err != nil {
		final = failed(st, w.cfg.NodeID, err, w.now())
		log.Error(err, "VolumeCommit failed", "volumeID", loc.src.VolumeID)
		w.event(vc, corev1.EventTypeWarning, ReasonCommitFailed, final.Message)
	} else {
		final = succeeded(st, res, w.now())
		log.Info("VolumeCommit done", "volumeID", loc.src.VolumeID, "imageRef", final.ImageRef, "uploadedBytes", res.Uploaded)
		w.event(vc, corev1.EventTypeNormal, ReasonCommitted, final.Message)
	}
	return w.writeFinal(ctx, client, u, final)
}

// CheckAllowedRegistries checks the registries of
// --commit-allowed-registries (Config.AllowedRegistries): each must be a
// host or host:port.
func CheckAllowedRegistries(regs []string) error {
	_, err := allowList(regs)
	return err
}

// CheckNamespaces checks the namespaces of --commit-namespaces
// (Config.Namespaces): each must be a namespace name.
func CheckNamespaces(namespaces []string) error {
	for _, ns := range namespaces {
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return fmt.Errorf("--commit-namespaces: %q is not a namespace name: %s", ns, strings.Join(errs, "; "))
		}
	}
	return nil
}

// allowList checks and normalizes the registries of
// --commit-allowed-registries.
func allowList(regs []string) (map[string]bool, error) {
	if len(regs) == 0 {
		return nil, nil
	}
	out := map[string]bool{}
	for _, r := range regs {
		if strings.Contains(r, "/") {
			return nil, fmt.Errorf("--commit-allowed-registries: %q: give a registry as host or host:port, without a scheme or a path", r)
		}
		reg, err := name.NewRegistry(r, name.StrictValidation)
		if err != nil {
			return nil, fmt.Errorf("--commit-allowed-registries: %q is not a registry (host or host:port): %w", r, err)
		}
		out[strings.ToLower(reg.RegistryStr())] = true
	}
	return out, nil
}

// disallowed says why image is on a registry that commits may not push
// to; empty when it may.
func (w *Watcher) disallowed(image string) string {
	if w.allowed == nil {
		return ""
	}
	ref, err := w.cfg.Store.ParseReference(image)
	if err != nil {
		return fmt.Sprintf("spec.image: %v", err)
	}
	reg := strings.ToLower(ref.Context().RegistryStr())
	if w.allowed[reg] {
		return ""
	}
	return fmt.Sprintf("spec.image %s is on registry %s, which VolumeCommits may not push to: this cluster allows only %s "+
		"(--commit-allowed-registries); push to one of them", image, reg, strings.Join(slices.Sorted(maps.Keys(w.allowed)), ", "))
}

// writeFinal writes the final status of a commit this node did. This node
// owns the object: a conflict is someone's edit of it, so it reads the
// object again and writes over the status. A status it could not write is
// kept for the retry.
func (w *Watcher) writeFinal(ctx context.Context, client dynamic.ResourceInterface, u *unstructured.Unstructured, final Status) error {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := client.Get(ctx, u.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.GetUID() != u.GetUID() {
			return nil // deleted and created anew meanwhile
		}
		return w.writeStatus(ctx, client, cur, final)
	})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		w.mu.Lock()
		w.unwritten[u.GetUID()] = final
		w.mu.Unlock()
		return fmt.Errorf("write the status of VolumeCommit %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return nil
}

// commit does vc with src: the base read with the push secret's or the
// driver's credentials, the push with the push secret's alone.
func (w *Watcher) commit(ctx context.Context, vc *VolumeCommit, src commit.Source) (commit.Result, error) {
	target, err := commit.ParseTarget(w.cfg.Store, vc.Spec.Image)
	if err != nil {
		return commit.Result{}, fmt.Errorf("spec.image: %w", err)
	}
	base, err := commit.Base(w.cfg.Store, src)
	if err != nil {
		return commit.Result{}, err
	}
	auth, err := w.credentials(ctx, vc, target.String(), base.String())
	if err != nil {
		return commit.Result{}, err
	}
	src.CreatedBy += fmt.Sprintf(" for VolumeCommit %s", vc.key())
	return commit.VolumeAuth(ctx, w.cfg.Store, src, target, auth, nil)
}

// credentials returns what the commit of vc reaches registries with. The
// push to target sees only the push secret (read in the VolumeCommit's
// namespace): the driver's own credentials are never offered to it, or
// anyone who may create a VolumeCommit could push wherever the node may.
// The read of base takes the first match of the push secret and the
// driver's own sources (its ServiceAccount's pull secrets, credential
// providers), as a publish of the volume did.
func (w *Watcher) credentials(ctx context.Context, vc *VolumeCommit, target, base string) (commit.Auth, error) {
	secrets, err := w.pushSecret(ctx, vc)
	if err != nil {
		return commit.Auth{}, err
	}
	var auth commit.Auth
	for _, c := range []struct {
		ref   string
		chain Credentials
		kc    *authn.Keychain
	}{
		{base, w.cfg.Credentials, &auth.Base},
		{target, w.secretOnly, &auth.Target},
	} {
		p, err := c.chain.For(ctx, c.ref, secrets, credentials.Pod{})
		if err != nil {
			return commit.Auth{}, fmt.Errorf("credentials for %s: %s", c.ref, strings.ReplaceAll(err.Error(),
				"the volume's node-publish secret", "spec.pushSecretName "+vc.Spec.PushSecretName))
		}
		*c.kc = p.Keychain
	}
	if auth.Target == nil {
		klog.FromContext(ctx).V(2).Info("No push credentials for the target's registry in spec.pushSecretName: pushing anonymously",
			"pushSecretName", vc.Spec.PushSecretName)
	}
	return auth, nil
}

// pushSecret reads vc's push secret, as the request secrets that the
// credential chain takes first; nil without one.
func (w *Watcher) pushSecret(ctx context.Context, vc *VolumeCommit) (map[string]string, error) {
	if vc.Spec.PushSecretName == "" {
		return nil, nil
	}
	s, err := w.cfg.Kube.CoreV1().Secrets(vc.Namespace).Get(ctx, vc.Spec.PushSecretName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("spec.pushSecretName: read secret %s/%s: %w", vc.Namespace, vc.Spec.PushSecretName, err)
	}
	if s.Type != corev1.SecretTypeDockerConfigJson && s.Type != corev1.SecretTypeDockercfg {
		return nil, fmt.Errorf("spec.pushSecretName: secret %s/%s is of type %s: it must be a %s secret",
			vc.Namespace, s.Name, s.Type, corev1.SecretTypeDockerConfigJson)
	}
	out := make(map[string]string, len(s.Data))
	for k, v := range s.Data {
		out[k] = string(v)
	}
	return out, nil
}

// writeStatus updates u's status to st through the status subresource,
// with u's resourceVersion.
func (w *Watcher) writeStatus(ctx context.Context, client dynamic.ResourceInterface, u *unstructured.Unstructured, st Status) error {
	out, err := withStatus(u, st)
	if err != nil {
		return err
	}
	_, err = client.UpdateStatus(ctx, out, metav1.UpdateOptions{FieldManager: w.cfg.DriverName})
	return err
}

// ignoreConflict is nil for a conflict: the object changed since it was
// read, and the informer brings the new version.
func ignoreConflict(err error) error {
	if apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// event records an event on vc; it never blocks.
func (w *Watcher) event(vc *VolumeCommit, typ, reason, msg string) {
	if w.events == nil {
		return
	}
	ref := &corev1.ObjectReference{APIVersion: Group + "/" + Version, Kind: Kind,
		Namespace: vc.Namespace, Name: vc.Name, UID: vc.UID, ResourceVersion: vc.ResourceVersion}
	w.events.Event(ref, typ, reason, msg)
}

func (w *Watcher) takeUnwritten(uid types.UID) (Status, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	st, ok := w.unwritten[uid]
	delete(w.unwritten, uid)
	return st, ok
}

func (w *Watcher) isRunning(key string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.running[key]
}

func (w *Watcher) setRunning(key string, on bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if on {
		w.running[key] = true
	} else {
		delete(w.running, key)
	}
}
