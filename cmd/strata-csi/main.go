// Command strata-csi is Strata's CSI plugin: the node service that kubelet
// calls to publish image volumes (--mode=node, a DaemonSet), the controller
// service that provisions them (--mode=controller), or both on one socket
// (--mode=all, for tests and single machines).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver"
	"github.com/strata-csi/strata/driver/capacity"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/health"
	"github.com/strata-csi/strata/driver/provisioner"
	"github.com/strata-csi/strata/driver/registration"
	"github.com/strata-csi/strata/layercache"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// commaList is a string list flag given comma-separated, repeatable.
type commaList []string

func (l *commaList) String() string { return strings.Join(*l, ",") }
func (l *commaList) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

func main() {
	klog.InitFlags(nil)
	var (
		endpoint    = flag.String("endpoint", "unix:///var/lib/kubelet/plugins/strata.csi.dev/csi.sock", "CSI endpoint, unix:///path/to/csi.sock")
		nodeID      = flag.String("node-id", "", "this node's name (required in node mode)")
		root        = flag.String("root", "/var/lib/strata", "node state root: the layer cache and published volumes")
		mode        = flag.String("mode", string(driver.ModeNode), "services to serve: node, controller or all")
		name        = flag.String("driver-name", driver.DefaultName, "CSI driver name")
		concurrency = flag.Int("concurrency", layercache.DefaultConcurrency, "layers fetched and unpacked at once")
		showVersion = flag.Bool("version", false, "print the version and exit")
		regDir      = flag.String("kubelet-registration-dir", "", "kubelet's plugin registration directory, e.g. /var/lib/kubelet/plugins_registry: register the plugin with kubelet through a socket there (empty = do not register)")
		kubeletCSI  = flag.String("kubelet-csi-endpoint", "", "the CSI socket path as kubelet sees it on the host, told to kubelet at registration (default: the path of --endpoint)")
		healthAddr  = flag.String("health-address", "", "address of the liveness endpoint GET /healthz, e.g. :9808 (empty = off)")
		metricsAddr = flag.String("metrics-address", "", "address of the Prometheus endpoint GET /metrics, e.g. :9809 (empty = off)")
		maxBytes    = flag.String("cache-max-bytes", "", "cache budget, e.g. 50Gi: unused layers are evicted, least recently used first, past the high watermark, and a pull that cannot fit fails as it unpacks; replaces --cache-max-percent (0 = unbounded)")
		maxPercent  = flag.Float64("cache-max-percent", layercache.DefaultMaxPercent, "cache budget as a percentage of the state root's filesystem, unless --cache-max-bytes is given (0 = unbounded)")
		maxExpand   = flag.Float64("layer-max-expansion", layercache.DefaultMaxExpansion, "most times its compressed size that one layer may take unpacked, never under 64 MiB: a decompression bomb stops there (0 = no ceiling)")
		layerMax    = flag.String("layer-max-bytes", layercache.FormatBytes(layercache.DefaultMaxLayerBytes), "most that one layer may take unpacked, e.g. 100Gi (0 = no limit)")
		highMark    = flag.Float64("cache-high-watermark", layercache.DefaultHighWatermark, "fraction of the budget past which unused layers are evicted")
		lowMark     = flag.Float64("cache-low-watermark", layercache.DefaultLowWatermark, "fraction of the budget that eviction goes down to")
		minAge      = flag.Duration("cache-min-age", layercache.DefaultMinAge, "layers used more recently than this are never evicted")
		kubeconfig  = flag.String("kubeconfig", "", "kubeconfig for the Kubernetes API (events on pods, pull secrets); empty: the pod's in-cluster config when run in a pod, else no API access")
		verifyCreds = flag.String("pull-credentials-verification", "AlwaysVerify", "AlwaysVerify: a cached private image serves only publishes whose credentials pulled it or that the registry accepts (as kubelet's KEP-2535); NeverVerify: any publish may use any cached image")
		pullSA      = flag.String("pull-secrets-service-account", "", "NAMESPACE/NAME of a ServiceAccount whose imagePullSecrets are pull credentials for volumes without a matching node-publish secret, watched through the API (empty = off)")
		providerCfg = flag.String("image-credential-provider-config", "", "kubelet CredentialProviderConfig file (kubelet.config.k8s.io/v1): credential provider exec plugins asked for images that no secret has credentials for (empty = off)")
		providerBin = flag.String("image-credential-provider-bin-dir", "", "directory of the credential provider executables named in --image-credential-provider-config")
		providerTTL = flag.Duration("image-credential-provider-timeout", credentials.DefaultProviderTimeout, "time a credential provider plugin may take to answer before it is killed")
		podIdentity = flag.Bool("pod-identity", false, "pull with the pod's own identity too (needs the CSIDriver's podInfoOnMount, and tokenRequests for token providers): the imagePullSecrets of the pod's ServiceAccount that a SubjectAccessReview shows it may get, and credential providers with tokenAttributes, given the pod's ServiceAccount token for their audience")
		regConfig   = flag.String("registry-config", "", "node-wide registry config file (YAML: mirrors, plain-HTTP hosts, per-host CA bundles and client certificates; see docs/registries.md), reloaded when it changes (empty = none)")
		provision   = flag.Bool("provisioner", true, "in --mode=controller (and --mode=all with API access): provision the PersistentVolumeClaims of StorageClasses whose provisioner is --driver-name, in-process (sig-storage-lib-external-provisioner); false: serve only the CSI controller service, e.g. to the upstream csi-provisioner sidecar")
		resize      = flag.Bool("resizer", true, "with the in-process provisioner: also grow the PersistentVolumes of claims that ask for more (external-resizer's duty, in-process, under the same leader election); false: leave it to the upstream csi-resizer sidecar")
		leaderElect = flag.Bool("leader-election", false, "provision only while holding the Lease <driver name with dots as dashes> (e.g. strata-csi-dev), so that one of several controller replicas provisions at a time")
		leaderNS    = flag.String("leader-election-namespace", "", "namespace of the leader election Lease (empty: the pod's own namespace, from $POD_NAMESPACE or its service account)")
		commits     = flag.Bool("volume-commits", false, "in node mode with API access: carry out the VolumeCommits (strata.csi.dev/v1alpha1) of this node's volumes, reading the pods, claims, PersistentVolumes and push secrets they name in any namespace (needs the chart's volumeCommits RBAC); off: VolumeCommits are not watched")
		capacityNS  = flag.String("capacity-namespace", "", "namespace of the CSIStorageCapacity objects (the driver's own): with API access, a node plugin publishes there its node's room for new clones, one object per StorageClass of the driver, which the scheduler reads (needs the CSIDriver's storageCapacity: true), and the controller's GetCapacity reads them (empty = none published)")
		capacityInt = flag.Duration("capacity-poll-interval", capacity.DefaultInterval, "how often a node plugin measures its room for clones and updates its CSIStorageCapacity objects, besides after each clone's stage and removal")
		upperSize   = flag.String("default-upper-size", resource.NewQuantity(engine.DefaultUpperSize, resource.BinarySI).String(), "cap on the writable upper of an inline volume or static PersistentVolume that sets no size attribute, a Kubernetes quantity such as 10Gi (at least 1Mi); 0: no default cap, such uppers are directories on the --root filesystem")
		insecure    stringList
		prepull     stringList
		allowedRegs commaList
		commitNS    commaList
	)
	flag.Var(&commitNS, "commit-namespaces", "namespaces (comma-separated or repeated) whose VolumeCommits are carried out, so that their RBAC can be Roles in those namespaces; VolumeCommits elsewhere are not watched (empty = every namespace)")
	flag.Var(&allowedRegs, "commit-allowed-registries", "registries (host or host:port, comma-separated or repeated) that VolumeCommits may push to, matched exactly; a commit to another is refused (empty = any)")
	flag.Var(&prepull, "prepull", "image to pull at start and keep cached while it is listed; repeatable")
	flag.Var(&insecure, "insecure-registry", "registry (host[:port]) reached over plain HTTP; repeatable (loopback registries always are)")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "strata-csi: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	cacheOpts := []layercache.Option{
		layercache.WithConcurrency(*concurrency),
		layercache.WithInsecureRegistries(insecure...),
		layercache.WithUserAgent("strata-csi/" + version),
	}
	if *regConfig != "" {
		cacheOpts = append(cacheOpts, layercache.WithRegistryConfig(*regConfig))
	}
	switch *verifyCreds {
	case "AlwaysVerify":
	case "NeverVerify":
		cacheOpts = append(cacheOpts, layercache.WithoutCredentialCheck())
	default:
		fmt.Fprintf(os.Stderr, "strata-csi: --pull-credentials-verification=%q: use AlwaysVerify or NeverVerify\n", *verifyCreds)
		os.Exit(2)
	}
	budget := layercache.Budget{High: *highMark, Low: *lowMark, MinAge: *minAge}
	percent := *maxPercent
	if *maxBytes != "" {
		n, err := layercache.ParseBytes(*maxBytes)
		if err != nil {
			fmt.Fprintf(os.Stderr, "strata-csi: --cache-max-bytes: %v\n", err)
			os.Exit(2)
		}
		if isSet("cache-max-percent") && percent != 0 {
			fmt.Fprintln(os.Stderr, "strata-csi: --cache-max-bytes and --cache-max-percent both given: give the cache budget one way")
			os.Exit(2)
		}
		// The byte count replaces the default percentage.
		budget.MaxBytes, percent = n, 0
	}
	var defaultUpper int64
	if v := strings.TrimSpace(*upperSize); v != "0" {
		n, err := engine.ParseUpperSize(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "strata-csi: --default-upper-size: %v; or 0 for no default cap\n", err)
			os.Exit(2)
		}
		defaultUpper = n
	}
	maxLayer, err := layercache.ParseBytes(*layerMax)
	if err != nil {
		fmt.Fprintf(os.Stderr, "strata-csi: --layer-max-bytes: %v\n", err)
		os.Exit(2)
	}
	cacheOpts = append(cacheOpts, layercache.WithLayerLimits(layercache.Limits{
		MaxExpansion: *maxExpand, ExpansionFloor: layercache.DefaultExpansionFloor, MaxLayerBytes: maxLayer}))
	kube, dyn, err := kubeClient(*kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "strata-csi: --kubeconfig: %v\n", err)
		os.Exit(2)
	}
	if err := run(*endpoint, sidecars{registrationDir: *regDir, kubeletCSIEndpoint: *kubeletCSI, healthAddress: *healthAddr, metricsAddress: *metricsAddr,
		provision: *provision, resize: *resize, leaderElection: *leaderElect, leaderElectionNamespace: *leaderNS}, driver.Config{
		Name: *name, Version: version, NodeID: *nodeID, Root: *root, Mode: driver.Mode(*mode),
		CacheBudget: budget, CacheMaxPercent: percent,
		CacheOptions: cacheOpts, Kube: kube, Dynamic: dyn, DefaultUpperSize: defaultUpper,
		VolumeCommits: *commits, CommitAllowedRegistries: allowedRegs, CommitNamespaces: commitNS, Prepull: prepull,
		CapacityNamespace: *capacityNS, CapacityInterval: *capacityInt,
		PullCredentials: credentials.Config{
			ServiceAccount: *pullSA, ProviderConfig: *providerCfg, ProviderBinDir: *providerBin, ProviderTimeout: *providerTTL,
			PodIdentity: *podIdentity,
		},
	}); err != nil {
		klog.ErrorS(err, "strata-csi failed")
		klog.Flush()
		os.Exit(1)
	}
}

// isSet reports whether the flag name was given on the command line.
func isSet(name string) bool {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// kubeClient connects to the Kubernetes API with kubeconfig, or with the
// in-cluster config when the plugin runs in a pod; nil outside a cluster.
// The dynamic client reaches the VolumeCommit custom resources.
func kubeClient(kubeconfig string) (kubernetes.Interface, dynamic.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	switch {
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	case os.Getenv("KUBERNETES_SERVICE_HOST") != "":
		cfg, err = rest.InClusterConfig()
	default:
		klog.InfoS("No Kubernetes API access (not in a pod, no --kubeconfig): no events on pods, no VolumeCommits")
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	cfg.UserAgent = "strata-csi/" + version
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	return kube, dyn, err
}

// sidecars configures the node-side duties that the upstream sidecars
// (node-driver-registrar, livenessprobe) have elsewhere.
type sidecars struct {
	registrationDir    string // kubelet's plugins_registry; empty = do not register
	kubeletCSIEndpoint string // the CSI socket as kubelet sees it; empty = the --endpoint path
	healthAddress      string // GET /healthz; empty = off
	metricsAddress     string // GET /metrics; empty = off
	// The in-process provisioner (csi-provisioner's duty), in controller
	// and all modes.
	provision               bool
	resize                  bool // with provision: the in-process resizer too
	leaderElection          bool
	leaderElectionNamespace string // empty: the pod's own
}

// run serves CSI on endpoint, and beside it the kubelet registration socket
// and the health endpoint if configured, until SIGTERM or SIGINT. A failure
// of any of them stops all and is returned.
func run(endpoint string, side sidecars, cfg driver.Config) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	csiSock, err := driver.SocketPath(endpoint)
	if err != nil {
		return err
	}
	kubeletCSI := side.kubeletCSIEndpoint // the CSI socket as kubelet sees it
	if kubeletCSI == "" {
		if kubeletCSI, err = filepath.Abs(csiSock); err != nil {
			return err
		}
	} else if kubeletCSI, err = driver.SocketPath(kubeletCSI); err != nil {
		return fmt.Errorf("--kubelet-csi-endpoint: %w", err)
	}
	provision := side.provision && (cfg.Mode == driver.ModeController || cfg.Mode == driver.ModeAll)
	if provision && cfg.Kube == nil {
		if cfg.Mode == driver.ModeController {
			return errors.New("--mode=controller provisions PersistentVolumes through the Kubernetes API, and there is no API access: run it in a pod, give --kubeconfig, or pass --provisioner=false to serve only the CSI controller service")
		}
		klog.InfoS("No Kubernetes API access: PersistentVolumeClaims are not provisioned")
		provision = false
	}
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Recover(); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := d.Start(); err != nil { // prepulls, the clone sweep, VolumeCommits
		return err
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		sideErr error
	)
	fail := func(err error) { // a sidecar failed: stop everything
		mu.Lock()
		sideErr = errors.Join(sideErr, err)
		mu.Unlock()
		cancel()
	}

	if side.healthAddress != "" {
		prober, err := health.NewCSIProber(csiSock)
		if err != nil {
			return err
		}
		defer prober.Close()
		if err := serveHTTP(ctx, &wg, fail, "health", side.healthAddress, health.Path, health.Handler(prober.Probe)); err != nil {
			return err
		}
	}
	if side.metricsAddress != "" {
		mux := http.NewServeMux()
		mux.Handle(metricsPath, d.MetricsHandler())
		if err := serveHTTP(ctx, &wg, fail, "metrics", side.metricsAddress, metricsPath, mux); err != nil {
			return err
		}
	}

	if side.registrationDir != "" {
		name := cfg.Name
		if name == "" {
			name = driver.DefaultName
		}
		reg := registration.New(name, kubeletCSI, side.registrationDir)
		wg.Go(func() {
			// Kubelet calls the CSI endpoint right after GetInfo: register
			// only once the CSI socket listens.
			if err := registration.WaitForSocket(ctx, csiSock, 50*time.Millisecond); err != nil {
				if ctx.Err() == nil {
					fail(err)
				}
				return
			}
			if err := reg.Serve(ctx); err != nil {
				fail(err)
			}
		})
	}

	if provision {
		name := cfg.Name
		if name == "" {
			name = driver.DefaultName
		}
		p, err := provisioner.New(name, driver.TopologyKey, d, provisioner.WithNodes(provisioner.NodesFrom(cfg.Kube)),
			provisioner.WithDriverNodes(provisioner.DriverNodesFrom(cfg.Kube, name, driver.TopologyKey)), provisioner.WithKube(cfg.Kube))
		if err != nil {
			return err
		}
		rc := provisioner.RunConfig{LeaderElection: side.leaderElection, Namespace: side.leaderElectionNamespace}
		if side.resize {
			if rc.Resizer, err = provisioner.NewResizer(name, d, cfg.Kube); err != nil {
				return err
			}
		}
		wg.Go(func() {
			err := provisioner.Run(ctx, cfg.Kube, p, rc)
			if err != nil {
				fail(err)
			}
		})
	}

	err = d.Serve(ctx, endpoint)
	cancel()
	wg.Wait()
	return errors.Join(err, sideErr)
}

// metricsPath is where Prometheus metrics are served.
const metricsPath = "/metrics"

// serveHTTP listens on addr (failing at once if it cannot: a port in use is
// a configuration error) and serves h until ctx ends. A later serving error
// calls fail, which stops the plugin.
func serveHTTP(ctx context.Context, wg *sync.WaitGroup, fail func(error), what, addr, path string, h http.Handler) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("%s address: %w", what, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	klog.InfoS("Serving "+what+" endpoint", "address", lis.Addr().String(), "path", path)
	wg.Go(func() {
		if err := srv.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
			fail(fmt.Errorf("%s server: %w", what, err))
		}
	})
	wg.Go(func() {
		<-ctx.Done()
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		if err := srv.Shutdown(sctx); err != nil {
			klog.ErrorS(err, "HTTP server did not stop cleanly", "server", what)
		}
	})
	return nil
}
