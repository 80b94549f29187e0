package registration

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const (
	driverName = "strata.csi.dev"
	csiPath    = "/var/lib/kubelet/plugins/strata.csi.dev/csi.sock"
)

// start serves a Server in regDir until the test ends, and returns it once
// its socket listens, with a stop func that ends Serve's context and returns
// Serve's result.
func start(t *testing.T, regDir string) (*Server, func() error) {
	t.Helper()
	s := New(driverName, csiPath, regDir)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	stop := sync.OnceValue(func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			return errors.New("serve did not return 10s after cancel")
		}
	})
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	waitCtx, waitCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer waitCancel()
	if err := WaitForSocket(waitCtx, s.SocketPath(), 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	return s, stop
}

// dial connects to a registration socket as kubelet does.
func dial(t *testing.T, sock string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func TestSocketPath(t *testing.T) {
	if got, want := SocketPath("/var/lib/kubelet/plugins_registry", driverName), "/var/lib/kubelet/plugins_registry/strata.csi.dev-reg.sock"; got != want {
		t.Errorf("SocketPath = %q, want %q", got, want)
	}
}

func TestKubeletRegistration(t *testing.T) {
	regDir := filepath.Join(t.TempDir(), "plugins_registry") // created by Serve
	s, stop := start(t, regDir)
	sock := filepath.Join(regDir, "strata.csi.dev-reg.sock")
	if s.SocketPath() != sock {
		t.Fatalf("SocketPath = %q, want %q", s.SocketPath(), sock)
	}
	if fi, err := os.Stat(sock); err != nil {
		t.Fatalf("registration socket while serving: %v", err)
	} else if fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("%s is %v, not a socket", sock, fi.Mode())
	}
	if st := s.LastStatus(); st.Notified {
		t.Errorf("LastStatus before any notification = %+v, want Notified false", st)
	}

	ctx, ctxCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ctxCancel()
	c := dial(t, sock)
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != driverName || info.GetEndpoint() != csiPath ||
		!slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Errorf("GetInfo = %+v, want CSIPlugin %s at %s, versions [1.0.0]", info, driverName, csiPath)
	}

	before := time.Now()
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(true): %v", err)
	}
	if st := s.LastStatus(); !st.Notified || !st.Registered || st.Error != "" || st.Time.Before(before) {
		t.Errorf("LastStatus after success = %+v", st)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "some error"}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(false): %v", err)
	}
	if st := s.LastStatus(); !st.Notified || st.Registered || st.Error != "some error" {
		t.Errorf("LastStatus after failure = %+v, want not registered with %q", st, "some error")
	}

	if err := stop(); err != nil {
		t.Fatalf("Serve after cancel: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("registration socket after stop: %v, want it gone", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	regDir := t.TempDir()
	sock := SocketPath(regDir, driverName)
	// A socket file left by a crashed instance: nothing listens on it.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("stale socket: %v", err)
	}

	start(t, regDir)
	info, err := dial(t, sock).GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo through the replaced socket: %v", err)
	}
	if info.GetName() != driverName {
		t.Errorf("GetInfo name = %q", info.GetName())
	}
}

func TestStaleRegularFileReplaced(t *testing.T) {
	regDir := t.TempDir()
	sock := SocketPath(regDir, driverName)
	if err := os.WriteFile(sock, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	start(t, regDir)
	if _, err := dial(t, sock).GetInfo(context.Background(), &registerapi.InfoRequest{}); err != nil {
		t.Fatalf("GetInfo through the replaced socket: %v", err)
	}
}

func TestStopLeavesAReplacedSocket(t *testing.T) {
	regDir := t.TempDir()
	_, stop := start(t, regDir)
	sock := SocketPath(regDir, driverName)
	// A newer instance took the path over while this one still runs.
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	newer, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Errorf("the newer instance's socket was removed: %v", err)
	}
}

func TestServeFailsOnUnusableDir(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err := New(driverName, csiPath, file).Serve(context.Background())
	if err == nil {
		t.Fatal("Serve in a directory that is a file: no error")
	}
}

func TestWaitForSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := WaitForSocket(ctx, sock, 10*time.Millisecond); err == nil {
		t.Fatal("WaitForSocket with nothing listening: no error")
	}

	go func() {
		time.Sleep(50 * time.Millisecond)
		lis, err := net.Listen("unix", sock)
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { lis.Close() })
	}()
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := WaitForSocket(ctx2, sock, 10*time.Millisecond); err != nil {
		t.Fatalf("WaitForSocket: %v", err)
	}
}
