package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	csitest "github.com/strata-csi/strata/test/csi"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds strata-csi once per test run and returns its path.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "strata-csi-test-")
		if err != nil {
			buildErr = err
			return
		}
		binPath, buildErr = csitest.BuildPlugin(dir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// syncBuffer is a bytes.Buffer safe for the process's writes and the test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// plugin is a running strata-csi process.
type plugin struct {
	cmd    *exec.Cmd
	logs   *syncBuffer
	exited chan struct{} // closed when the process has exited
	err    error         // Wait's result, set before exited is closed
}

// startPlugin starts strata-csi with args; the test's cleanup kills it if it
// still runs.
func startPlugin(t *testing.T, args ...string) *plugin {
	t.Helper()
	p := &plugin{cmd: exec.Command(binary(t), args...), logs: &syncBuffer{}, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("strata-csi output:\n%s", p.logs.String())
		}
	})
	return p
}

// stop sends SIGTERM and waits for the process to exit.
func (p *plugin) stop(t *testing.T) error {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
		return p.err
	case <-time.After(30 * time.Second):
		t.Fatal("strata-csi did not exit within 30s of SIGTERM")
		return nil
	}
}

// dialUnix connects a gRPC client to the unix socket at path.
func dialUnix(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// getInfo acts as kubelet's plugin watcher: it waits for the registration
// socket to appear and answer GetInfo.
func getInfo(t *testing.T, p *plugin, sock string) *registerapi.PluginInfo {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-p.exited:
			t.Fatalf("strata-csi exited before registering: %v", p.err)
		default:
		}
		if _, err := os.Stat(sock); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			info, err := registerapi.NewRegistrationClient(dialUnix(t, sock)).GetInfo(ctx, &registerapi.InfoRequest{})
			cancel()
			switch {
			case err == nil:
				return info
			case status.Code(err) == codes.Unavailable && time.Now().Before(deadline):
				// The socket file appears at bind(2), a moment before
				// listen(2): a connection in between is refused (seen in CI).
			default:
				t.Fatalf("GetInfo: %v", err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no registration socket %s answering after 30s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// healthz GETs url until it answers (the server may not listen yet) and
// returns the status code and body.
func healthz(t *testing.T, url string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			return resp.StatusCode, string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestKubeletRegistrationAndHealth(t *testing.T) {
	tmp := t.TempDir()
	csiSock := filepath.Join(tmp, "csi.sock")
	regDir := filepath.Join(tmp, "reg")
	regSock := filepath.Join(regDir, "strata.csi.dev-reg.sock")
	healthAddr := freePort(t)
	p := startPlugin(t, "--mode=controller", "--provisioner=false", "--endpoint", "unix://"+csiSock,
		"--kubelet-registration-dir", regDir, "--health-address", healthAddr)

	info := getInfo(t, p, regSock)
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != "strata.csi.dev" || info.GetEndpoint() != csiSock ||
		strings.Join(info.GetSupportedVersions(), ",") != "1.0.0" {
		t.Fatalf("GetInfo = %+v, want CSIPlugin strata.csi.dev at %s, versions [1.0.0]", info, csiSock)
	}

	// Kubelet calls the endpoint right after GetInfo: it must answer now.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pi, err := csi.NewIdentityClient(dialUnix(t, info.GetEndpoint())).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		t.Fatalf("GetPluginInfo on the registered endpoint: %v", err)
	}
	if pi.GetName() != "strata.csi.dev" {
		t.Errorf("GetPluginInfo name = %q", pi.GetName())
	}
	reg := registerapi.NewRegistrationClient(dialUnix(t, regSock))
	if _, err := reg.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("NotifyRegistrationStatus: %v", err)
	}

	if code, body := healthz(t, "http://"+healthAddr+"/healthz"); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Fatalf("GET /healthz = %d %q, want 200 ok", code, body)
	}

	if err := p.stop(t); err != nil {
		t.Fatalf("strata-csi after SIGTERM: %v, want exit 0", err)
	}
	for _, sock := range []string{regSock, csiSock} {
		if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after exit: %v, want it gone", sock, err)
		}
	}
	if logs := p.logs.String(); !strings.Contains(logs, "Registered with kubelet") {
		t.Errorf("no registration success in the log:\n%s", logs)
	}
}

func TestKubeletCSIEndpointFlag(t *testing.T) {
	tmp := t.TempDir()
	regDir := filepath.Join(tmp, "reg")
	hostPath := "/var/lib/kubelet/plugins/strata.csi.dev/csi.sock"
	p := startPlugin(t, "--mode=controller", "--provisioner=false", "--endpoint", "unix://"+filepath.Join(tmp, "csi.sock"),
		"--driver-name", "other.csi.dev", "--kubelet-registration-dir", regDir, "--kubelet-csi-endpoint", hostPath)
	info := getInfo(t, p, filepath.Join(regDir, "other.csi.dev-reg.sock"))
	if info.GetName() != "other.csi.dev" || info.GetEndpoint() != hostPath {
		t.Errorf("GetInfo = %+v, want other.csi.dev at %s", info, hostPath)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("strata-csi after SIGTERM: %v, want exit 0", err)
	}
}

func TestNoSidecarsByDefault(t *testing.T) {
	tmp := t.TempDir()
	csiSock := filepath.Join(tmp, "csi.sock")
	p := startPlugin(t, "--mode=controller", "--provisioner=false", "--endpoint", "unix://"+csiSock)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(csiSock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no CSI socket after 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("strata-csi after SIGTERM: %v, want exit 0", err)
	}
	if logs := p.logs.String(); strings.Contains(logs, "registration") || strings.Contains(logs, "health") {
		t.Errorf("registration or health started without their flags:\n%s", logs)
	}
}

func TestHealthAddressInUse(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	tmp := t.TempDir()
	p := startPlugin(t, "--mode=controller", "--provisioner=false", "--endpoint", "unix://"+filepath.Join(tmp, "csi.sock"),
		"--health-address", lis.Addr().String())
	select {
	case <-p.exited:
		var exit *exec.ExitError
		if !errors.As(p.err, &exit) || exit.ExitCode() != 1 {
			t.Errorf("strata-csi with its health address in use: %v, want exit 1", p.err)
		}
		if logs := p.logs.String(); !strings.Contains(logs, "health address") {
			t.Errorf("no word of the health address in the log:\n%s", logs)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("strata-csi with its health address in use still runs after 30s")
	}
}
