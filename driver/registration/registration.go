// Package registration registers the CSI plugin with kubelet through
// kubelet's plugin-registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1),
// the node-side duty that the upstream node-driver-registrar sidecar has
// elsewhere.
//
// Kubelet watches its plugins_registry directory. When a socket appears
// there it dials it, calls GetInfo to learn the plugin's type, name and CSI
// endpoint, calls the CSI endpoint (NodeGetInfo), and reports the outcome
// with NotifyRegistrationStatus. When the socket goes away kubelet
// deregisters the plugin. A Server serves that socket for as long as its
// context lives, and removes it when the context ends.
package registration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI versions the plugin tells kubelet it speaks.
var SupportedVersions = []string{"1.0.0"}

// stopTimeout bounds the graceful stop of the registration server: an RPC
// still running after it is cut off.
const stopTimeout = 5 * time.Second

// Status is the outcome kubelet last reported through NotifyRegistrationStatus.
type Status struct {
	// Notified is false until kubelet has called NotifyRegistrationStatus.
	Notified bool
	// Registered is kubelet's PluginRegistered: whether it accepted the plugin.
	Registered bool
	// Error is kubelet's error text when it did not register the plugin.
	Error string
	// Time is when the notification arrived.
	Time time.Time
}

// Server serves kubelet's Registration gRPC service for one CSI driver on
// <registrationDir>/<driverName>-reg.sock. Create it with New.
type Server struct {
	registerapi.UnimplementedRegistrationServer

	driverName string
	endpoint   string // the CSI socket path as kubelet sees it
	socket     string // the registration socket this server listens on

	mu     sync.Mutex
	status Status
}

// New returns a Server that registers the CSI driver driverName, whose CSI
// socket kubelet reaches at csiEndpointPath (a path on the host, as kubelet
// sees it: not a unix:// URL), through a socket in registrationDir (kubelet's
// plugins_registry directory, usually /var/lib/kubelet/plugins_registry).
func New(driverName, csiEndpointPath, registrationDir string) *Server {
	return &Server{
		driverName: driverName,
		endpoint:   csiEndpointPath,
		socket:     SocketPath(registrationDir, driverName),
	}
}

// SocketPath is the registration socket of driverName in registrationDir:
// <registrationDir>/<driverName>-reg.sock, the name node-driver-registrar uses.
func SocketPath(registrationDir, driverName string) string {
	return filepath.Join(registrationDir, driverName+"-reg.sock")
}

// SocketPath returns the registration socket this server listens on.
func (s *Server) SocketPath() string { return s.socket }

// Serve listens on the registration socket until ctx ends, then stops
// gracefully and removes the socket, so that kubelet deregisters the plugin.
// A stale socket file from an earlier run is replaced. The directory is
// created if missing. Serve returns nil when it stopped because ctx ended.
func (s *Server) Serve(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(s.socket), 0o750); err != nil {
		return fmt.Errorf("create registration directory: %w", err)
	}
	if err := os.Remove(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale registration socket %s: %w", s.socket, err)
	}
	lis, err := net.Listen("unix", s.socket)
	if err != nil {
		return fmt.Errorf("listen on registration socket %s: %w", s.socket, err)
	}
	// The socket is removed below, and only if it is still ours: a newer
	// instance of the plugin may have replaced it while this one stops.
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	ours, err := os.Stat(s.socket)
	if err != nil {
		lis.Close()
		return fmt.Errorf("registration socket %s: %w", s.socket, err)
	}
	defer s.removeSocket(ours)

	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, s)
	klog.InfoS("Serving kubelet plugin registration", "socket", s.socket, "driver", s.driverName, "csiEndpoint", s.endpoint)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("registration server: %w", err)
	case <-ctx.Done():
	}
	// Remove the socket first: kubelet deregisters the plugin as soon as it
	// is gone, even if a call still in flight delays the stop.
	s.removeSocket(ours)
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(stopTimeout):
		srv.Stop()
		<-stopped
	}
	klog.InfoS("Stopped kubelet plugin registration", "socket", s.socket)
	return nil
}

// removeSocket removes the registration socket file if it is still there
// and still the one this server created (ours).
func (s *Server) removeSocket(ours os.FileInfo) {
	fi, err := os.Stat(s.socket)
	if err != nil || !os.SameFile(fi, ours) {
		return
	}
	if err := os.Remove(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.ErrorS(err, "Cannot remove registration socket", "socket", s.socket)
	}
}

// GetInfo tells kubelet that this is a CSI plugin, its name, and where its
// CSI endpoint is.
func (s *Server) GetInfo(ctx context.Context, req *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.V(2).InfoS("Kubelet asked for plugin info", "driver", s.driverName)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.driverName,
		Endpoint:          s.endpoint,
		SupportedVersions: append([]string(nil), SupportedVersions...),
	}, nil
}

// NotifyRegistrationStatus records kubelet's verdict and logs it: a refusal
// is logged as an error with kubelet's reason.
func (s *Server) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.mu.Lock()
	s.status = Status{Notified: true, Registered: st.GetPluginRegistered(), Error: st.GetError(), Time: time.Now()}
	s.mu.Unlock()
	if st.GetPluginRegistered() {
		klog.InfoS("Registered with kubelet", "driver", s.driverName, "csiEndpoint", s.endpoint)
	} else {
		reason := st.GetError()
		if reason == "" {
			reason = "kubelet gave no reason"
		}
		klog.ErrorS(errors.New(reason), "Kubelet did not register the plugin", "driver", s.driverName, "csiEndpoint", s.endpoint)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// LastStatus returns what kubelet last reported through
// NotifyRegistrationStatus; Notified is false if it has not reported yet.
func (s *Server) LastStatus() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// WaitForSocket waits until something accepts connections on the unix
// socket at path, polling every interval, or until ctx ends. Use it to
// register with kubelet only once the CSI socket is listening: kubelet
// calls the CSI endpoint right after GetInfo. A stale socket file that
// nothing listens on does not count.
func WaitForSocket(ctx context.Context, path string, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr error
	for {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := d.DialContext(dctx, "unix", path)
		cancel()
		if err == nil {
			conn.Close()
			return nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s to listen: %w (last: %v)", path, ctx.Err(), lastErr)
		case <-t.C:
		}
	}
}
