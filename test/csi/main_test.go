package csitest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// pluginBin is the strata-csi binary TestMain builds once.
var pluginBin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "test/csi: the integration suite mounts overlays and must run as root")
		return 1
	}
	dir, err := os.MkdirTemp("", "strata-csi-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// STRATA_CSI_BIN names a prebuilt plugin: hack/vm-test runs the suite
	// in a VM without the Go toolchain.
	if pluginBin = os.Getenv("STRATA_CSI_BIN"); pluginBin == "" {
		if pluginBin, err = BuildPlugin(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return m.Run()
}

// env is one test's world: a temp dir whose mounts are cleaned up, a plugin
// in node mode with its own state root, and a client.
type env struct {
	t    testing.TB
	dir  string // the test's temp dir; every mount of the test is below it
	root string // the plugin's --root
	*Plugin
}

// newEnv starts a node plugin on a fresh root below a fresh temp dir.
func newEnv(t testing.TB) *env {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	return &env{t: t, dir: dir, root: root, Plugin: startPlugin(t, root)}
}

// startPlugin starts `strata-csi --mode=node` on root.
func startPlugin(t testing.TB, root string) *Plugin {
	t.Helper()
	return Start(t, Options{Bin: pluginBin, Root: root, Mode: "node"})
}

// target returns a fresh target path whose parent exists and which itself
// does not, as kubelet prepares it.
func (e *env) target(name string) string {
	e.t.Helper()
	parent := filepath.Join(e.dir, "pods", name, "volumes")
	if err := os.MkdirAll(parent, 0o750); err != nil {
		e.t.Fatal(err)
	}
	return filepath.Join(parent, "vol")
}

// mountCap is a filesystem capability with the given access mode.
func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

// pubReq is a NodePublishVolume request as kubelet sends it for an inline
// volume with the given attributes.
func pubReq(volID, target string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:         volID,
		TargetPath:       target,
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
		VolumeContext:    attrs,
	}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

// publish publishes and fails the test on error.
func (e *env) publish(req *csi.NodePublishVolumeRequest) {
	e.t.Helper()
	if _, err := e.Node.NodePublishVolume(ctx(e.t), req); err != nil {
		e.t.Fatalf("NodePublishVolume %s at %s: %v", req.VolumeId, req.TargetPath, err)
	}
}

// publishImage publishes image read-write at a new target and returns it.
func (e *env) publishImage(volID, image string) string {
	e.t.Helper()
	tgt := e.target(volID)
	e.publish(pubReq(volID, tgt, map[string]string{"image": image}))
	return tgt
}

func (e *env) unpublish(volID, target string) error {
	_, err := e.Node.NodeUnpublishVolume(ctx(e.t), &csi.NodeUnpublishVolumeRequest{VolumeId: volID, TargetPath: target})
	return err
}

// wantCode checks that err is a gRPC status with code, and that its message
// contains every one of words.
func wantCode(t *testing.T, err error, code codes.Code, words ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got success, want %v", code)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("got non-status error %v, want %v", err, code)
	}
	if st.Code() != code {
		t.Fatalf("got %v (%s), want %v", st.Code(), st.Message(), code)
	}
	for _, w := range words {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("%v message %q does not name %q", code, st.Message(), w)
		}
	}
}

// mountCount is the number of mounts stacked exactly at path.
func mountCount(t testing.TB, path string) int {
	t.Helper()
	return len(MountsAt(t, path))
}

// volumeRecord is the part of volumes/<key>/volume.json the tests read.
type volumeRecord struct {
	VolumeID   string `json:"volumeID"`
	TargetPath string `json:"targetPath"`
}

// volumeDirs returns the volumes/<key> dirs of the root, by target path.
func (e *env) volumeDirs() map[string]string {
	e.t.Helper()
	entries, err := os.ReadDir(filepath.Join(e.root, "volumes"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		e.t.Fatal(err)
	}
	out := map[string]string{}
	for _, ent := range entries {
		dir := filepath.Join(e.root, "volumes", ent.Name())
		var rec volumeRecord
		data, err := os.ReadFile(filepath.Join(dir, "volume.json"))
		if err == nil {
			err = json.Unmarshal(data, &rec)
		}
		if err != nil {
			out["?"+ent.Name()] = dir
			continue
		}
		out[rec.TargetPath] = dir
	}
	return out
}

// volumeDir is the volumes/<key> dir of the publish at target.
func (e *env) volumeDir(target string) string {
	e.t.Helper()
	d, ok := e.volumeDirs()[target]
	if !ok {
		e.t.Fatalf("no volumes/*/volume.json records target %s (have %v)", target, e.volumeDirs())
	}
	return d
}

// refFiles lists <root>/refs/*.json.
func (e *env) refFiles() []string {
	e.t.Helper()
	m, err := filepath.Glob(filepath.Join(e.root, "refs", "*.json"))
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// assertClean checks that the root holds no volume, no reference and that
// nothing is mounted below the test's dir.
func (e *env) assertClean() {
	e.t.Helper()
	e.assertCleanBut("")
}

func readString(t testing.TB, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
