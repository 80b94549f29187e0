package health

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// get fetches path from srv and returns the status code and body.
func get(t *testing.T, srv *httptest.Server, path string) (int, string) {
	t.Helper()
	resp, err := srv.Client().Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestHandler(t *testing.T) {
	for _, tc := range []struct {
		name     string
		probe    func(context.Context) error
		timeout  time.Duration // 0: Handler's default
		code     int
		body     string
		maxTaken time.Duration
	}{
		{name: "ok", probe: func(context.Context) error { return nil }, code: 200, body: "ok"},
		{name: "error", probe: func(context.Context) error { return errors.New("driver is not ready") }, code: 500, body: "driver is not ready"},
		{
			name: "slow, honours its context",
			probe: func(ctx context.Context) error {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Minute):
					return nil
				}
			},
			timeout: 200 * time.Millisecond, code: 500, body: "timed out", maxTaken: 5 * time.Second,
		},
		{
			name:    "slow, ignores its context",
			probe:   func(context.Context) error { time.Sleep(2 * time.Second); return nil },
			timeout: 100 * time.Millisecond, code: 500, body: "timed out", maxTaken: 1500 * time.Millisecond,
		},
		{
			name: "slow, default timeout",
			probe: func(ctx context.Context) error {
				<-ctx.Done()
				return ctx.Err()
			},
			code: 500, body: "timed out after 3s", maxTaken: 10 * time.Second,
		},
		{name: "panics", probe: func(context.Context) error { panic("boom") }, code: 500, body: "boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := Handler(tc.probe)
			if tc.timeout > 0 {
				h = HandlerWithTimeout(tc.probe, tc.timeout)
			}
			srv := httptest.NewServer(h)
			defer srv.Close()
			start := time.Now()
			code, body := get(t, srv, "/healthz")
			taken := time.Since(start)
			if code != tc.code || !strings.Contains(body, tc.body) {
				t.Errorf("GET /healthz = %d %q, want %d containing %q", code, body, tc.code, tc.body)
			}
			if tc.maxTaken > 0 && taken > tc.maxTaken {
				t.Errorf("GET /healthz took %v, want at most %v", taken, tc.maxTaken)
			}
		})
	}
}

func TestHandlerOtherRequests(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(Handler(func(context.Context) error { calls.Add(1); return nil }))
	defer srv.Close()
	if code, _ := get(t, srv, "/"); code != http.StatusNotFound {
		t.Errorf("GET / = %d, want 404", code)
	}
	if code, _ := get(t, srv, "/healthz/x"); code != http.StatusNotFound {
		t.Errorf("GET /healthz/x = %d, want 404", code)
	}
	resp, err := srv.Client().Post(srv.URL+"/healthz", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz = %d, want 405", resp.StatusCode)
	}
	resp, err = srv.Client().Head(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("HEAD /healthz = %d, want 200", resp.StatusCode)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("probe called %d times, want 1 (HEAD only)", n)
	}
}

// fakeIdentity is a CSI Identity server whose Probe answers ready.
type fakeIdentity struct {
	csi.UnimplementedIdentityServer
	ready *wrapperspb.BoolValue
	err   error
}

func (f *fakeIdentity) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if f.err != nil {
		return nil, f.err
	}
	return &csi.ProbeResponse{Ready: f.ready}, nil
}

// serveCSI serves id on a unix socket in a temp dir and returns its path.
func serveCSI(t *testing.T, id csi.IdentityServer) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	csi.RegisterIdentityServer(srv, id)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return sock
}

func TestCSIProber(t *testing.T) {
	for _, tc := range []struct {
		name    string
		id      *fakeIdentity
		wantErr string // "" = healthy
	}{
		{name: "ready", id: &fakeIdentity{ready: wrapperspb.Bool(true)}},
		{name: "ready unset", id: &fakeIdentity{}},
		{name: "not ready", id: &fakeIdentity{ready: wrapperspb.Bool(false)}, wantErr: "not ready"},
		{name: "probe fails", id: &fakeIdentity{err: errors.New("cache is broken")}, wantErr: "cache is broken"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := serveCSI(t, tc.id)
			p, err := NewCSIProber(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			// Through the HTTP handler, as kubelet's liveness probe sees it.
			srv := httptest.NewServer(Handler(p.Probe))
			defer srv.Close()
			code, body := get(t, srv, "/healthz")
			if tc.wantErr == "" {
				if code != 200 || strings.TrimSpace(body) != "ok" {
					t.Errorf("GET /healthz = %d %q, want 200 ok", code, body)
				}
				return
			}
			if code != 500 || !strings.Contains(body, tc.wantErr) {
				t.Errorf("GET /healthz = %d %q, want 500 containing %q", code, body, tc.wantErr)
			}
		})
	}
}

func TestCSIProberNothingListening(t *testing.T) {
	p, err := NewCSIProber(filepath.Join(t.TempDir(), "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := p.Probe(ctx); err == nil {
		t.Fatal("Probe with nothing listening: no error")
	}
}
