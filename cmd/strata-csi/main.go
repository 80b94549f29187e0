// Command strata-csi is Strata's CSI plugin: the node service that kubelet
// calls to publish image volumes (--mode=node, a DaemonSet), the controller
// service that provisions them (--mode=controller), or both on one socket
// (--mode=all, for tests and single machines).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver"
	"github.com/strata-csi/strata/layercache"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

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
		insecure    stringList
	)
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
	if err := run(*endpoint, driver.Config{
		Name: *name, Version: version, NodeID: *nodeID, Root: *root, Mode: driver.Mode(*mode),
		CacheOptions: []layercache.Option{
			layercache.WithConcurrency(*concurrency),
			layercache.WithInsecureRegistries(insecure...),
			layercache.WithUserAgent("strata-csi/" + version),
		},
	}); err != nil {
		klog.ErrorS(err, "strata-csi failed")
		klog.Flush()
		os.Exit(1)
	}
}

func run(endpoint string, cfg driver.Config) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Recover(); err != nil {
		return err
	}
	return d.Serve(ctx, endpoint)
}
