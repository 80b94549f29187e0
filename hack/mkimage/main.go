// Command mkimage builds test images deterministically from a seed and pushes
// them to a registry.
//
// The same flags always give byte-identical layers and the same digests. The
// generated image is cached as an OCI layout under --cache (default
// .cache/images at the repository root), keyed by kind and parameters; a
// cached image is only pushed, not regenerated. Pushing is cheap when the
// registry already has the blobs, so it is fine to push again after
// hack/registry restarts (it keeps manifests in memory only).
//
// Kinds:
//
//	dataset  the small sample dataset of the README demo: two layers with an
//	         added file, a whiteout (data/.wh.old.csv) and an opaque
//	         directory (data/raw/.wh..wh..opq); a few hundred KB.
//	bench    ~1 GiB in 8 layers and ~49k files, shaped like a real ML image
//	         (~450 MB gzip), with symlinks, hardlinks, model weights, and a
//	         top layer of whiteouts and one opaque directory.
//	many     100 small layers of a few dozen files each.
//
// Usage:
//
//	mkimage [--kind] dataset|bench|many [--ref HOST/REPO:TAG] [flags]
//
// With --ref the image is pushed and REF@DIGEST is printed on stdout; with
// --list-blobs the layer blob paths of the cached layout are printed, bottom
// layer first. Progress and the layer table go to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// genVersion is part of every cache key: bump it whenever a change to the
// generators changes the bytes they produce.
const genVersion = 1

type options struct {
	kind        string
	ref         string
	cache       string
	seed        uint64
	scale       float64
	compression string
	jobs        int
	listBlobs   bool
	force       bool
	quiet       bool
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	var o options
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	fs.StringVar(&o.kind, "kind", "", "image kind: dataset, bench or many (or give it as the first argument)")
	fs.StringVar(&o.ref, "ref", "", "push the image to this reference, e.g. 127.0.0.1:5000/bench:v1 (empty: only build)")
	fs.StringVar(&o.cache, "cache", "", "directory of cached OCI layouts (default: .cache/images at the repository root)")
	fs.Uint64Var(&o.seed, "seed", 1, "seed of the generator")
	fs.Float64Var(&o.scale, "scale", 1, "bench and many: multiply file counts and sizes by this (e.g. 0.01 for a quick test)")
	fs.StringVar(&o.compression, "compression", "gzip", "layer compression: gzip, zstd or none")
	fs.IntVar(&o.jobs, "jobs", runtime.GOMAXPROCS(0), "layers generated in parallel")
	fs.BoolVar(&o.listBlobs, "list-blobs", false, "print the paths of the layer blobs, bottom layer first")
	fs.BoolVar(&o.force, "force", false, "regenerate even if the image is cached")
	fs.BoolVar(&o.quiet, "quiet", false, "print no progress or layer table")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: mkimage [--kind] dataset|bench|many [--ref REF] [flags]\n\n")
		fs.PrintDefaults()
	}
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		o.kind, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	switch o.kind {
	case "dataset", "bench", "many":
	case "":
		return errors.New("no kind given: want dataset, bench or many (see --help)")
	default:
		return fmt.Errorf("unknown kind %q: want dataset, bench or many", o.kind)
	}
	if _, err := mediaType(o.compression); err != nil {
		return err
	}
	if !(o.scale > 0 && o.scale <= 10) {
		return fmt.Errorf("--scale %v out of range (0, 10]", o.scale)
	}
	if o.jobs < 1 {
		return fmt.Errorf("--jobs must be at least 1")
	}
	var ref name.Reference
	if o.ref != "" {
		var err error
		if ref, err = name.ParseReference(o.ref); err != nil {
			return fmt.Errorf("--ref: %w", err)
		}
	}
	if o.cache == "" {
		o.cache = filepath.Join(repoRoot(), ".cache", "images")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, meta, err := ensureImage(ctx, &o)
	if err != nil {
		return err
	}
	if o.listBlobs {
		for _, l := range meta.Layers {
			fmt.Println(filepath.Join(dir, "blobs", "sha256", l.Digest.Hex))
		}
	}
	if ref == nil {
		return nil
	}
	return push(ctx, &o, dir, meta, ref)
}

// cacheKey names the cached layout of an image built with o.
func cacheKey(o *options) string {
	key := fmt.Sprintf("%s-%s-seed%d", o.kind, o.compression, o.seed)
	if o.kind != "dataset" && o.scale != 1 {
		key += "-scale" + strconv.FormatFloat(o.scale, 'g', -1, 64)
	}
	return fmt.Sprintf("%s-v%d", key, genVersion)
}

// ensureImage returns the cached layout for o, generating it if needed.
func ensureImage(ctx context.Context, o *options) (string, *cacheMeta, error) {
	key := cacheKey(o)
	dir := filepath.Join(o.cache, key)
	if !o.force {
		if meta, err := readCached(dir); err == nil {
			o.logf("using cached %s (generated in %.1fs)\n", dir, meta.Seconds)
			o.printTable(meta)
			return dir, meta, nil
		}
	}
	if err := os.MkdirAll(o.cache, 0o755); err != nil {
		return "", nil, fmt.Errorf("cache directory: %w", err)
	}
	tmp, err := os.MkdirTemp(o.cache, "."+key+".tmp-")
	if err != nil {
		return "", nil, fmt.Errorf("cache directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	stopCleanup := context.AfterFunc(ctx, func() { os.RemoveAll(tmp) })
	defer stopCleanup()

	start := time.Now()
	var plans []*layerPlan
	switch o.kind {
	case "dataset":
		plans = datasetPlans(o.seed)
	case "bench":
		plans = benchPlans(o.seed, o.scale)
	case "many":
		plans = manyPlans(o.seed, o.scale)
	}
	o.logf("generating %s (%d layers, %s, %d jobs) into %s\n", key, len(plans), o.compression, o.jobs, dir)
	meta, err := buildLayout(tmp, key, plans, o.compression, o.jobs, func(l layerInfo) {
		if len(plans) > 20 {
			return
		}
		o.logf("  %-16s %9s -> %9s  %6d files  %5.1fs\n", l.Name, mib(l.Uncompressed), mib(l.Size), l.Files, l.Seconds)
	})
	if ctx.Err() != nil {
		return "", nil, fmt.Errorf("interrupted")
	}
	if err != nil {
		return "", nil, fmt.Errorf("generate %s: %w", key, err)
	}
	if o.force {
		if err := os.RemoveAll(dir); err != nil {
			return "", nil, err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another mkimage may have finished the same image first.
		if m, err2 := readCached(dir); err2 == nil {
			meta = m
		} else {
			return "", nil, fmt.Errorf("cache: %w", err)
		}
	}
	o.logf("generated in %.1fs\n", time.Since(start).Seconds())
	o.printTable(meta)
	return dir, meta, nil
}

func push(ctx context.Context, o *options, dir string, meta *cacheMeta, ref name.Reference) error {
	p, err := layout.FromPath(dir)
	if err != nil {
		return err
	}
	img, err := p.Image(meta.Manifest)
	if err != nil {
		return fmt.Errorf("cached layout %s: %w", dir, err)
	}
	start := time.Now()
	err = remote.Write(ref, img,
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithJobs(4))
	if err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	o.logf("pushed %s in %.1fs\n", ref, time.Since(start).Seconds())
	fmt.Printf("%s@%s\n", ref.Context().Name(), meta.Manifest)
	return nil
}

func (o *options) logf(format string, args ...any) {
	if !o.quiet {
		fmt.Fprintf(os.Stderr, format, args...)
	}
}

func (o *options) printTable(meta *cacheMeta) {
	if o.quiet {
		return
	}
	fmt.Fprintf(os.Stderr, "%-4s %-16s %12s %12s %7s %8s  %s\n", "#", "layer", "compressed", "uncompressed", "files", "entries", "digest")
	var c, u int64
	var files, entries int
	for i, l := range meta.Layers {
		c += l.Size
		u += l.Uncompressed
		files += l.Files
		entries += l.Entries
		if n := len(meta.Layers); n > 20 && i >= 3 && i < n-2 {
			if i == 3 {
				fmt.Fprintf(os.Stderr, "...  (%d more layers)\n", n-5)
			}
			continue
		}
		fmt.Fprintf(os.Stderr, "%-4d %-16s %12s %12s %7d %8d  %s\n", i+1, l.Name, mib(l.Size), mib(l.Uncompressed), l.Files, l.Entries, l.Digest.Hex[:12])
	}
	fmt.Fprintf(os.Stderr, "%-4s %-16s %12s %12s %7d %8d  manifest %s\n", "", "total", mib(c), mib(u), files, entries, meta.Manifest)
}

func mib(n int64) string {
	if n < 10<<20 {
		return fmt.Sprintf("%.1fKiB", float64(n)/1024)
	}
	return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
}

// repoRoot is the nearest directory above the working directory holding
// go.mod, or the working directory.
func repoRoot() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return wd
		}
	}
}
