// Command registry runs a local OCI registry for demos, tests and benchmarks.
//
// It serves go-containerregistry's in-process registry (pkg/registry) on a
// loopback address only. Blobs are kept in memory, or on disk under --dir;
// manifests are always kept in memory, so they are gone after a restart and
// images must be pushed again (hack/mkimage does that cheaply: blobs that are
// already on disk are not uploaded again).
//
// Usage:
//
//	go run ./hack/registry [--addr 127.0.0.1:5000] [--dir DIR] [--quiet]
//
// When it is ready it prints exactly one line on stdout,
//
//	registry listening on 127.0.0.1:PORT
//
// with the real port (so --addr 127.0.0.1:0 picks a free one), and it shuts
// down cleanly on SIGINT or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "registry: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("registry", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:5000", "listen address; must be a loopback address (use port 0 for a free port)")
	dir := fs.String("dir", "", "directory for blobs (empty: keep blobs in memory)")
	quiet := fs.Bool("quiet", false, "do not log each request")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: registry [flags]\n\nA local OCI registry on a loopback address, for demos and benchmarks.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if err := checkLoopback(*addr); err != nil {
		return err
	}

	var opts []registry.Option
	reqLog := log.New(os.Stderr, "registry: ", log.LstdFlags)
	if *quiet {
		reqLog = log.New(io.Discard, "", 0)
	}
	opts = append(opts, registry.Logger(reqLog))
	if *dir != "" {
		abs, err := filepath.Abs(*dir)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(abs, 0o755); err != nil {
			return fmt.Errorf("blob directory: %w", err)
		}
		opts = append(opts, registry.WithBlobHandler(newStatCache(registry.NewDiskBlobHandler(abs), abs)))
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *addr, err)
	}
	srv := &http.Server{
		Handler:           registry.New(opts...),
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          log.New(os.Stderr, "registry: http: ", log.LstdFlags),
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Printf("registry listening on %s\n", ln.Addr())
	if !*quiet {
		where := "memory"
		if *dir != "" {
			where = *dir
		}
		fmt.Fprintf(os.Stderr, "registry: blobs in %s; manifests in memory\n", where)
	}

	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	stop() // a second signal kills the process the usual way
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// checkLoopback refuses listen addresses that are not loopback: this registry
// has no authentication and must not be reachable from other machines.
func checkLoopback(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid --addr %q: %v (want HOST:PORT, e.g. 127.0.0.1:5000)", addr, err)
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("invalid --addr %q: bad port %q", addr, port)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("refusing to listen on %q: this registry has no authentication, so --addr must be a loopback address (127.0.0.1, ::1 or localhost)", addr)
	}
	return nil
}

// statCache wraps the disk blob handler so that a blob's digest is verified
// once per process rather than on every request: the upstream handler rehashes
// the whole file on every HEAD and GET, which would double the registry's
// reads and skew pull benchmarks. A blob is re-verified if its size or
// modification time changes.
type statCache struct {
	registry.BlobHandler
	dir string

	mu       sync.Mutex
	verified map[v1.Hash]fileStamp
}

type fileStamp struct {
	size  int64
	mtime time.Time
}

func newStatCache(h registry.BlobHandler, dir string) *statCache {
	return &statCache{BlobHandler: h, dir: dir, verified: map[v1.Hash]fileStamp{}}
}

func (s *statCache) Stat(ctx context.Context, repo string, h v1.Hash) (int64, error) {
	fi, err := os.Stat(filepath.Join(s.dir, h.Algorithm, h.Hex))
	if errors.Is(err, os.ErrNotExist) {
		return 0, registry.ErrNotFound
	} else if err != nil {
		return 0, err
	}
	stamp := fileStamp{fi.Size(), fi.ModTime()}
	s.mu.Lock()
	got, ok := s.verified[h]
	s.mu.Unlock()
	if ok && got == stamp {
		return stamp.size, nil
	}
	size, err := s.BlobHandler.(registry.BlobStatHandler).Stat(ctx, repo, h)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.verified[h] = stamp
	s.mu.Unlock()
	return size, nil
}

func (s *statCache) Put(ctx context.Context, repo string, h v1.Hash, rc io.ReadCloser) error {
	return s.BlobHandler.(registry.BlobPutHandler).Put(ctx, repo, h, rc)
}

func (s *statCache) Delete(ctx context.Context, repo string, h v1.Hash) error {
	s.mu.Lock()
	delete(s.verified, h)
	s.mu.Unlock()
	return s.BlobHandler.(registry.BlobDeleteHandler).Delete(ctx, repo, h)
}
