package main

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// apiLog is a stand-in Kubernetes API server that records the paths asked
// for and answers every request 404 (a JSON Status): enough for the plugin
// to start and show what it reaches for.
type apiLog struct {
	mu    sync.Mutex
	paths []string
}

func (a *apiLog) serve(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.paths = append(a.paths, r.Method+" "+r.URL.Path)
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprint(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`)
	}))
	t.Cleanup(srv.Close)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q}}]
users: [{name: test, user: {token: test}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
`, srv.URL)
	if err := os.WriteFile(kubeconfig, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return kubeconfig
}

// asked lists the requests whose path contains s.
func (a *apiLog) asked(s string) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, p := range a.paths {
		if strings.Contains(p, s) {
			out = append(out, p)
		}
	}
	return out
}

// TestVolumeCommitsOptIn: a node plugin with API access does not watch
// VolumeCommits (so needs no RBAC for them, nor for the secrets they name)
// unless --volume-commits is given; with it, it asks the API for them, and
// with --commit-namespaces only in those namespaces.
func TestVolumeCommitsOptIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestVolumeCommitsOptIn needs root: the node plugin opens a layer cache")
	}
	for _, namespaces := range []string{"", "team-a,team-b"} {
		t.Run("commit-namespaces="+namespaces, func(t *testing.T) {
			var api apiLog
			kubeconfig := api.serve(t)
			tmp := t.TempDir()
			args := []string{"--mode=node", "--node-id=node-1", "--root", filepath.Join(tmp, "root"),
				"--endpoint", "unix://" + filepath.Join(tmp, "csi.sock"), "--kubeconfig", kubeconfig, "--volume-commits"}
			if namespaces != "" {
				args = append(args, "--commit-namespaces="+namespaces)
			}
			p := startPlugin(t, args...)
			want := []string{"GET /apis/strata.csi.dev/v1alpha1/volumecommits"}
			if namespaces != "" {
				want = []string{"GET /apis/strata.csi.dev/v1alpha1/namespaces/team-a/volumecommits"}
			}
			for deadline := time.Now().Add(30 * time.Second); len(api.asked("/volumecommits")) == 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("after 30s the API was asked for no VolumeCommits: %q", api.asked("/"))
				}
			}
			// The API answers 404 (no CRD): the plugin asks again only
			// after a minute, so its first question is all there is.
			time.Sleep(time.Second)
			if got := api.asked("/volumecommits"); !slices.Equal(got, want) {
				t.Errorf("the plugin asked for %q, want %q", got, want)
			}
			if err := p.stop(t); err != nil {
				t.Fatalf("strata-csi after SIGTERM: %v, want exit 0", err)
			}
		})
	}
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("volume-commits=%t", on), func(t *testing.T) {
			var api apiLog
			kubeconfig := api.serve(t)
			tmp := t.TempDir()
			csiSock := filepath.Join(tmp, "csi.sock")
			args := []string{"--mode=node", "--node-id=node-1", "--root", filepath.Join(tmp, "root"),
				"--endpoint", "unix://" + csiSock, "--kubeconfig", kubeconfig}
			if on {
				args = append(args, "--volume-commits", "--commit-allowed-registries=registry.example.com,127.0.0.1:5000")
			}
			p := startPlugin(t, args...)
			deadline := time.Now().Add(30 * time.Second)
			for {
				_, err := os.Stat(csiSock)
				if err == nil && (!on || len(api.asked("/volumecommits")) > 0) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("after 30s: CSI socket %v; the API was asked %q", err, api.asked("/"))
				}
				time.Sleep(20 * time.Millisecond)
			}
			if !on {
				// The socket serves after the watcher would have started:
				// give a late start a moment anyway.
				time.Sleep(time.Second)
				if got := api.asked("strata.csi.dev"); len(got) > 0 {
					t.Errorf("without --volume-commits the plugin asked for %q", got)
				}
			}
			if got := api.asked("/secrets"); len(got) > 0 {
				t.Errorf("the plugin read secrets: %q", got)
			}
			if err := p.stop(t); err != nil {
				t.Fatalf("strata-csi after SIGTERM: %v, want exit 0", err)
			}
		})
	}
}

// TestCommitFlagsRefused: an allow-list entry that is no registry, a
// namespace that is no namespace name, or either without --volume-commits,
// stops the plugin with a message naming the flag.
func TestCommitFlagsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"a URL", []string{"--volume-commits", "--commit-allowed-registries=https://registry.example.com"}},
		{"a path", []string{"--volume-commits", "--commit-allowed-registries=registry.example.com/team-a"}},
		{"without --volume-commits", []string{"--commit-allowed-registries=registry.example.com"}},
		{"a bad namespace", []string{"--volume-commits", "--commit-namespaces=Team_A"}},
		{"namespaces without --volume-commits", []string{"--commit-namespaces=team-a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			p := startPlugin(t, append([]string{"--mode=node", "--node-id=node-1", "--root", filepath.Join(tmp, "root"),
				"--endpoint", "unix://" + filepath.Join(tmp, "csi.sock")}, tc.args...)...)
			select {
			case <-p.exited:
				var exit *exec.ExitError
				if !errors.As(p.err, &exit) || exit.ExitCode() == 0 {
					t.Errorf("strata-csi %q: %v, want a failure", tc.args, p.err)
				}
				flag, _, _ := strings.Cut(tc.args[len(tc.args)-1], "=")
				if logs := p.logs.String(); !strings.Contains(logs, flag) {
					t.Errorf("the message does not name %s:\n%s", flag, logs)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("strata-csi %q still runs after 30s", tc.args)
			}
		})
	}
}
