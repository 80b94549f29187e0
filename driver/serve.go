package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/engine"
)

// Serve listens on endpoint (unix:///path/csi.sock) until ctx ends, then
// stops gracefully. A stale socket file from an earlier run is removed.
func (d *Driver) Serve(ctx context.Context, endpoint string) error {
	sock, err := SocketPath(endpoint)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
		return err
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.intercept))
	csi.RegisterIdentityServer(srv, d)
	if d.serves(ModeNode) {
		csi.RegisterNodeServer(srv, d)
	}
	if d.serves(ModeController) {
		csi.RegisterControllerServer(srv, d)
	}
	klog.InfoS("Serving CSI", "endpoint", endpoint, "driver", d.name, "mode", d.mode, "nodeID", d.cfg.NodeID, "version", d.cfg.Version)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		klog.InfoS("Stopping: published volumes stay mounted")
		srv.GracefulStop()
		return nil
	}
}

// SocketPath returns the socket path of a CSI endpoint given as
// unix:///abs/path, unix://rel/path or a plain path.
func SocketPath(endpoint string) (string, error) {
	if endpoint == "" {
		return "", errors.New("empty CSI endpoint")
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme == "" {
		return endpoint, nil // a plain path
	}
	if u.Scheme != "unix" || (u.Path == "" && u.Host == "") {
		return "", fmt.Errorf("endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	if u.Host != "" {
		return filepath.Join(u.Host, u.Path), nil
	}
	return u.Path, nil
}

// intercept logs every call (secrets stripped) at V(4) and every error,
// turns errors into gRPC status codes (toStatus, the one translation), and
// records each call's latency and code.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	klog.V(4).InfoS("CSI call", "method", info.FullMethod, "request", sanitize(req))
	start := time.Now()
	resp, err := handler(ctx, req)
	err = toStatus(err)
	d.metrics.ObserveCall(path.Base(info.FullMethod), status.Code(err), time.Since(start))
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod, "request", sanitize(req))
		return nil, err
	}
	klog.V(5).InfoS("CSI call done", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp))
	return resp, nil
}

// sanitize is a request as it may be logged: the fields the CSI spec marks
// secret stripped (protosanitizer), and the pod's ServiceAccount tokens in
// the volume context too, which the spec does not mark: kubelet puts them
// there (the CSIDriver's tokenRequests), and they are credentials.
func sanitize(req any) fmt.Stringer {
	if r, ok := req.(*csi.NodePublishVolumeRequest); ok {
		if _, has := r.GetVolumeContext()[engine.AttrTokens]; has {
			c := proto.Clone(r).(*csi.NodePublishVolumeRequest)
			c.VolumeContext[engine.AttrTokens] = redacted
			req = c
		}
	}
	return protosanitizer.StripSecrets(req)
}

// redacted replaces a credential in logs, as protosanitizer writes it.
const redacted = "***stripped***"
