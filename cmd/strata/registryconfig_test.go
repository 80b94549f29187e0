package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-csi/strata/test/testimage"
)

// --registry-config is a global flag: pull goes through the mirrors it lists,
// and a broken file stops the command with a message that names it.
func TestRegistryConfigFlag(t *testing.T) {
	requireRoot(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := l.Addr().String() // the registry: nothing listens there
	l.Close()
	mirror := testimage.Registry(t)
	push(t, mirror+"/data:v1", makeLayer(t, testimage.Gzip, testimage.File("a", "mirrored")))

	conf := filepath.Join(t.TempDir(), "registries.yaml")
	if err := os.WriteFile(conf, fmt.Appendf(nil, "registries:\n  %q:\n    mirrors: [%q]\n", down, mirror), 0o644); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	r := strata(t, root, "--registry-config", conf, "pull", down+"/data:v1")
	expectCode(t, "pull through the mirror", r, 0)

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("registries:\n  x.example.com:\n    mirrorz: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r = strata(t, root, "--registry-config", bad, "pull", down+"/data:v1")
	if r.code == 0 || !strings.Contains(r.stderr, bad) || !strings.Contains(r.stderr, "mirrorz") {
		t.Fatalf("pull with a broken registry config: want a failure naming %s and the key mirrorz, got %s", bad, r)
	}
}
