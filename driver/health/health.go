// Package health serves the plugin's liveness endpoint, GET /healthz, the
// duty that the upstream livenessprobe sidecar has elsewhere: each request
// calls the plugin's own CSI Probe over its CSI socket, so a plugin whose
// gRPC server hangs or whose driver is not ready fails kubelet's liveness
// probe.
package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
)

// Path is where Handler answers.
const Path = "/healthz"

// DefaultTimeout bounds one probe: a probe that takes longer fails.
const DefaultTimeout = 3 * time.Second

// Handler serves GET (and HEAD) /healthz: 200 "ok" when probe returns nil
// within DefaultTimeout, else 500 with the error's text. Other paths are 404.
func Handler(probe func(context.Context) error) http.Handler {
	return HandlerWithTimeout(probe, DefaultTimeout)
}

// HandlerWithTimeout is Handler with a probe timeout of its own. The probe's
// context ends at the timeout; a probe that ignores it still fails the
// request at the timeout (and is left to finish in the background).
func HandlerWithTimeout(probe func(context.Context) error, timeout time.Duration) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+Path, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if err := runProbe(r.Context(), probe, timeout); err != nil {
			klog.ErrorS(err, "Health check failed")
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintln(w, err.Error())
			return
		}
		klog.V(5).InfoS("Health check passed")
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// runProbe runs probe with a context that ends after timeout, and fails at
// the timeout even if probe does not return.
func runProbe(ctx context.Context, probe func(context.Context) error, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				errc <- fmt.Errorf("probe panicked: %v", p)
			}
		}()
		errc <- probe(ctx)
	}()
	select {
	case err := <-errc:
		if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("probe timed out after %v: %w", timeout, err)
		}
		return err
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("probe timed out after %v", timeout)
		}
		return ctx.Err()
	}
}

// CSIProber calls the CSI Probe of a plugin over its unix socket, as the
// upstream livenessprobe does. One connection is kept and reused (and
// re-established by gRPC when it breaks). Create it with NewCSIProber.
type CSIProber struct {
	conn     *grpc.ClientConn
	identity csi.IdentityClient
}

// NewCSIProber returns a prober for the plugin's CSI socket (a path; see
// driver.SocketPath for endpoints). It does not connect yet: each Probe
// does, if needed.
func NewCSIProber(sock string) (*CSIProber, error) {
	conn, err := grpc.NewClient("passthrough:///csi",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}))
	if err != nil {
		return nil, fmt.Errorf("CSI client for %s: %w", sock, err)
	}
	return &CSIProber{conn: conn, identity: csi.NewIdentityClient(conn)}, nil
}

// Probe calls the plugin's CSI Probe. It fails if the call fails or the
// plugin answers that it is not ready. An answer without Ready counts as
// ready, as the CSI spec says.
func (p *CSIProber) Probe(ctx context.Context) error {
	resp, err := p.identity.Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return fmt.Errorf("CSI Probe: %w", err)
	}
	if r := resp.GetReady(); r != nil && !r.GetValue() {
		return errors.New("CSI Probe: driver is not ready")
	}
	return nil
}

// Close closes the prober's connection.
func (p *CSIProber) Close() error { return p.conn.Close() }
