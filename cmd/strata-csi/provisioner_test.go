package main

import (
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestControllerNeedsAPI: the controller provisions through the Kubernetes
// API; without access to one it stops at once and says how to fix it.
func TestControllerNeedsAPI(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	p := startPlugin(t, "--mode=controller", "--endpoint", "unix://"+filepath.Join(t.TempDir(), "csi.sock"))
	select {
	case <-p.exited:
		var exit *exec.ExitError
		if !errors.As(p.err, &exit) || exit.ExitCode() != 1 {
			t.Errorf("strata-csi --mode=controller without API access: %v, want exit 1", p.err)
		}
		logs := p.logs.String()
		for _, want := range []string{"Kubernetes API", "--kubeconfig", "--provisioner=false"} {
			if !strings.Contains(logs, want) {
				t.Errorf("the error does not mention %q:\n%s", want, logs)
			}
		}
	case <-time.After(30 * time.Second):
		t.Fatal("strata-csi --mode=controller without API access still runs after 30s")
	}
}
