package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	csitest "github.com/strata-csi/strata/test/csi"
	"github.com/strata-csi/strata/test/testimage"
)

// binary is the strata command built once for all tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "strata-cli-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "strata")
	if err := goBuild(binary); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// goBuild builds this package into out, with extra go build flags (and
// -race when the tests run with it).
func goBuild(out string, flags ...string) error {
	return csitest.BuildCommand("github.com/strata-csi/strata/cmd/strata", out, flags...)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests unpack layers with overlayfs whiteouts (device nodes, trusted.* xattrs): run them as root")
	}
}

// result is what one run of strata did.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// strata runs the binary with --root root and args.
func strata(t *testing.T, root string, args ...string) result {
	t.Helper()
	return strataIn(t, root, "", args...)
}

// strataIn runs the binary with stdin.
func strataIn(t *testing.T, root, stdin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"--root", root}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("run strata %v: %v", args, err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
}

// expectCode fails the test unless r exited with code.
func expectCode(t *testing.T, what string, r result, code int) {
	t.Helper()
	if r.code != code {
		t.Fatalf("%s: want exit %d, got %s", what, code, r)
	}
}

// testLayer is a layer and what the cache should record about it.
type testLayer struct {
	layer v1.Layer
	size  int64 // bytes of regular-file content
	files int64
}

func (l testLayer) diffID(t *testing.T) v1.Hash {
	t.Helper()
	d, err := l.layer.DiffID()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// makeLayer builds a layer, counting its regular files and their bytes.
func makeLayer(t *testing.T, c testimage.Compression, entries ...testimage.Entry) testLayer {
	t.Helper()
	tl := testLayer{layer: testimage.Layer(t, testimage.Tar(t, entries...), c)}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name, "/") && e.Link == "" && e.Type == 0 && !strings.Contains(e.Name, ".wh.") {
			tl.files++
			tl.size += int64(len(e.Body))
		}
	}
	return tl
}

func push(t *testing.T, ref string, layers ...testLayer) v1.Hash {
	t.Helper()
	ls := make([]v1.Layer, len(layers))
	for i, l := range layers {
		ls[i] = l.layer
	}
	return testimage.Push(t, ref, testimage.Image(t, ls...))
}

var (
	layerLine   = regexp.MustCompile(`^layer (sha256:[0-9a-f]{12})… [0-9]+\.[0-9] MB (cached|pulled)$`)
	summaryLine = regexp.MustCompile(`^pulled (\S+)@(sha256:[0-9a-f]{64}): ([0-9]+) layers \(([0-9]+) cached\), [0-9]+\.[0-9] MB in [0-9]+\.[0-9] s \([0-9]+\.[0-9] MB/s\)$`)
)

// pullOutput is the parsed plain-text output of a pull.
type pullOutput struct {
	layers        map[string]string // short diffID -> cached|pulled
	ref, digest   string
	total, cached int
}

func parsePull(t *testing.T, r result) pullOutput {
	t.Helper()
	out := pullOutput{layers: map[string]string{}}
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	for i, line := range lines {
		if m := layerLine.FindStringSubmatch(line); m != nil {
			out.layers[m[1]] = m[2]
			continue
		}
		m := summaryLine.FindStringSubmatch(line)
		if m == nil || i != len(lines)-1 {
			t.Fatalf("pull output line %d is neither a layer line nor the final summary: %q\n%s", i+1, line, r)
		}
		out.ref, out.digest = m[1], m[2]
		out.total, _ = strconv.Atoi(m[3])
		out.cached, _ = strconv.Atoi(m[4])
	}
	if out.ref == "" {
		t.Fatalf("pull printed no summary line:\n%s", r)
	}
	return out
}

func short(d v1.Hash) string { return d.Algorithm + ":" + d.Hex[:12] }

func TestPullListUsagePrune(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	root := t.TempDir()

	base := makeLayer(t, testimage.Gzip,
		testimage.Dir("etc/"), testimage.File("etc/os-release", "ID=test\n"),
		testimage.Dir("data/"), testimage.File("data/a.bin", strings.Repeat("a", 300_000)))
	mid := makeLayer(t, testimage.Zstd,
		testimage.Dir("data/"), testimage.File("data/b.bin", strings.Repeat("b", 200_000)),
		testimage.File("data/c.txt", "c"))
	top := makeLayer(t, testimage.None,
		testimage.Dir("data/"), testimage.Whiteout("data/c.txt"), testimage.File("data/d.txt", "dd"))
	other := makeLayer(t, testimage.Gzip, testimage.Dir("srv/"), testimage.File("srv/e", "eee"))

	appRef, otherRef := reg+"/app:v1", reg+"/other:v1"
	appDigest := push(t, appRef, base, mid, top)
	otherDigest := push(t, otherRef, base, other)

	// A first pull fetches every layer.
	r := strata(t, root, "pull", appRef)
	expectCode(t, "first pull", r, 0)
	got := parsePull(t, r)
	if got.ref != appRef || got.digest != appDigest.String() || got.total != 3 || got.cached != 0 {
		t.Errorf("first pull summary: want %s@%s: 3 layers (0 cached), got %s@%s: %d layers (%d cached)",
			appRef, appDigest, got.ref, got.digest, got.total, got.cached)
	}
	for _, l := range []testLayer{base, mid, top} {
		if s := got.layers[short(l.diffID(t))]; s != "pulled" {
			t.Errorf("first pull: layer %s: want a line saying pulled, got %q\n%s", l.diffID(t), s, r)
		}
	}

	// A second pull finds every layer cached.
	r = strata(t, root, "pull", appRef)
	expectCode(t, "second pull", r, 0)
	got = parsePull(t, r)
	if got.total != 3 || got.cached != 3 || len(got.layers) != 3 {
		t.Errorf("second pull: want 3 layer lines and 3 layers (3 cached), got %d lines and %d layers (%d cached)\n%s",
			len(got.layers), got.total, got.cached, r)
	}
	for d, s := range got.layers {
		if s != "cached" {
			t.Errorf("second pull: layer %s: want cached, got %s", d, s)
		}
	}

	// An image sharing the base layer pulls only its own; flags may follow REF.
	r = strata(t, root, "pull", otherRef, "--policy", "Always", "--concurrency", "1")
	expectCode(t, "pull of an image sharing a layer", r, 0)
	got = parsePull(t, r)
	if got.total != 2 || got.cached != 1 || got.layers[short(base.diffID(t))] != "cached" || got.layers[short(other.diffID(t))] != "pulled" {
		t.Errorf("pull of %s: want the base layer cached and the other pulled, got:\n%s", otherRef, r)
	}

	// ls lists both images and all four layers.
	r = strata(t, root, "ls")
	expectCode(t, "ls", r, 0)
	for _, want := range []string{appRef, otherRef, short(appDigest), short(otherDigest),
		short(base.diffID(t)), short(mid.diffID(t)), short(top.diffID(t)), short(other.diffID(t))} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("ls: want %q in the output, got:\n%s", want, r.stdout)
		}
	}

	r = strata(t, root, "ls", "--json")
	expectCode(t, "ls --json", r, 0)
	var ls lsJSON
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, r.stdout)
	}
	wantImages := map[string]struct {
		digest v1.Hash
		layers []testLayer
	}{appRef: {appDigest, []testLayer{base, mid, top}}, otherRef: {otherDigest, []testLayer{base, other}}}
	if len(ls.Images) != len(wantImages) {
		t.Errorf("ls --json: want %d images, got %d: %+v", len(wantImages), len(ls.Images), ls.Images)
	}
	for _, im := range ls.Images {
		want, ok := wantImages[im.Ref]
		if !ok {
			t.Errorf("ls --json: unexpected image %q", im.Ref)
			continue
		}
		var size int64
		var ids []string
		for _, l := range want.layers {
			size += l.size
			ids = append(ids, l.diffID(t).String())
		}
		if im.Digest != want.digest.String() || !im.Complete || im.Size != size || strings.Join(im.Layers, ",") != strings.Join(ids, ",") {
			t.Errorf("ls --json: image %s: want digest %s, complete, size %d, layers %v; got %+v", im.Ref, want.digest, size, ids, im)
		}
	}
	wantLayers := map[string]testLayer{}
	for _, l := range []testLayer{base, mid, top, other} {
		wantLayers[l.diffID(t).String()] = l
	}
	if len(ls.Layers) != len(wantLayers) {
		t.Errorf("ls --json: want %d layers, got %d", len(wantLayers), len(ls.Layers))
	}
	for _, l := range ls.Layers {
		want, ok := wantLayers[l.DiffID]
		if !ok {
			t.Errorf("ls --json: unexpected layer %s", l.DiffID)
			continue
		}
		if l.Size != want.size || l.Files != want.files || len(l.Owners) != 0 {
			t.Errorf("ls --json: layer %s: want size %d, %d files, no owners; got size %d, %d files, owners %v",
				l.DiffID, want.size, want.files, l.Size, l.Files, l.Owners)
		}
		wantUsers := 1
		if l.DiffID == base.diffID(t).String() {
			wantUsers = 2
		}
		if len(l.Images) != wantUsers {
			t.Errorf("ls --json: layer %s: want %d images using it, got %v", l.DiffID, wantUsers, l.Images)
		}
	}

	// du agrees with the layers: the base is shared by two images and
	// counted once; the three others are unique; nothing is in use.
	r = strata(t, root, "du", "--bytes")
	expectCode(t, "du --bytes", r, 0)
	du := parseDu(t, r.stdout)
	unique := mid.size + top.size + other.size
	wantDu := map[string]int64{"images": 2, "layers": 4, "total": base.size + unique, "in use": 0,
		"shared": base.size, "unique": unique, "saved": base.size, "volumes": 0, "as copies": 0, "held": 0}
	for k, want := range wantDu {
		if du[k] != want {
			t.Errorf("du --bytes: %s: want %d, got %d\n%s", k, want, du[k], r.stdout)
		}
	}
	if len(du) != len(wantDu) {
		t.Errorf("du --bytes: %d lines, want %d:\n%s", len(du), len(wantDu), r.stdout)
	}
	r = strata(t, root, "du")
	expectCode(t, "du", r, 0)
	if !strings.Contains(r.stdout, humanBytes(base.size+unique)) {
		t.Errorf("du: want the total %s in the output, got:\n%s", humanBytes(base.size+unique), r.stdout)
	}

	// Nothing holds the layers: prune removes them all.
	r = strata(t, root, "prune")
	expectCode(t, "prune", r, 0)
	for id := range wantLayers {
		if !strings.Contains(r.stdout, "removed layer "+id) {
			t.Errorf("prune: want a line saying layer %s was removed, got:\n%s", id, r.stdout)
		}
	}
	if want := fmt.Sprintf("freed %s (4 layers)", humanBytes(base.size+unique)); !strings.Contains(r.stdout, want) {
		t.Errorf("prune: want %q, got:\n%s", want, r.stdout)
	}

	r = strata(t, root, "ls", "--json")
	expectCode(t, "ls --json after prune", r, 0)
	ls = lsJSON{}
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil {
		t.Fatalf("ls --json after prune: %v\n%s", err, r.stdout)
	}
	if len(ls.Images) != 0 || len(ls.Layers) != 0 {
		t.Errorf("ls --json after prune: want no images and no layers, got %+v", ls)
	}
	r = strata(t, root, "ls")
	expectCode(t, "ls after prune", r, 0)
	if strings.Contains(r.stdout, reg) || strings.Contains(r.stdout, "sha256:") {
		t.Errorf("ls after prune: want only the table headers, got:\n%s", r.stdout)
	}
}

func TestPullErrors(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	root := t.TempDir()
	push(t, reg+"/app:v1", makeLayer(t, testimage.Gzip, testimage.File("f", "x")))
	// 256 MiB in about 256 KiB of gzip.
	testimage.Push(t, reg+"/bomb:v1", testimage.Image(t, testimage.Bomb(t, testimage.Gzip, "big", 256<<20, 'b')))

	tests := []struct {
		name string
		args []string
		code int
		msg  string // wanted in the message on stderr
	}{
		{"missing tag", []string{"pull", reg + "/app:nope"}, exitNotFound, "check the image name and tag"},
		{"missing repository", []string{"pull", reg + "/nothing:v1"}, exitNotFound, "not found"},
		{"policy Never, not cached", []string{"pull", "--policy", "Never", reg + "/app:v1"}, exitNotCached, "pull policy is Never"},
		{"unreachable registry", []string{"pull", "127.0.0.1:1/app:v1"}, exitUnavailable, "127.0.0.1:1"},
		{"invalid reference", []string{"pull", "UPPER/case:v1"}, exitUsage, "invalid image reference"},
		{"decompression bomb, default limits", []string{"pull", reg + "/bomb:v1"}, exitFailure, "--layer-max-expansion"},
		{"decompression bomb, cache budget", []string{"pull", "--cache-max-bytes", "16Mi", "--layer-max-expansion", "0", reg + "/bomb:v1"},
			exitFailure, "cache budget of 16777216 bytes"},
		{"budget in bytes and percent", []string{"pull", "--cache-max-bytes", "1Gi", "--cache-max-percent", "10", reg + "/app:v1"}, exitUsage, "both given"},
		{"layer max bytes not a size", []string{"pull", "--layer-max-bytes", "lots", reg + "/app:v1"}, exitUsage, "--layer-max-bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := strata(t, root, tc.args...)
			expectCode(t, strings.Join(tc.args, " "), r, tc.code)
			if !strings.HasPrefix(r.stderr, "strata: ") || !strings.Contains(r.stderr, tc.msg) {
				t.Errorf("want a message on stderr starting %q and containing %q, got %q", "strata: ", tc.msg, r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("want nothing on stdout, got %q", r.stdout)
			}
		})
	}
}

// TestPullCredentials pulls from a registry that requires basic auth.
func TestPullCredentials(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	const user, pass = "alice", "s3cret"
	var locked atomic.Bool
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); locked.Load() && (!ok || u != user || p != pass) {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	ref := reg + "/private:v1"
	push(t, ref, makeLayer(t, testimage.Gzip, testimage.File("secret", "data")))
	locked.Store(true)

	r := strata(t, t.TempDir(), "pull", ref)
	expectCode(t, "anonymous pull", r, exitUnauthorize)
	r = strataIn(t, t.TempDir(), "wrong\n", "pull", "--username", user, "--password-stdin", ref)
	expectCode(t, "pull with a wrong password", r, exitUnauthorize)
	r = strataIn(t, t.TempDir(), pass+"\n", "pull", "--username", user, "--password-stdin", ref)
	expectCode(t, "pull with --password-stdin", r, 0)

	cfg := filepath.Join(t.TempDir(), "config.json")
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, reg, auth), 0o600); err != nil {
		t.Fatal(err)
	}
	r = strata(t, t.TempDir(), "pull", "--docker-config", cfg, ref)
	expectCode(t, "pull with --docker-config", r, 0)

	// The file's keys match as the plugin matches a pull secret's (kubelet's
	// keyring): a host glob with the port, or the repository's path prefix.
	host, port, _ := strings.Cut(reg, ":")
	glob := strings.Join(append(strings.Split(host, ".")[:3], "*"), ".") + ":" + port
	for _, key := range []string{glob, reg + "/private", reg + "/other"} {
		if err := os.WriteFile(cfg, fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, key, auth), 0o600); err != nil {
			t.Fatal(err)
		}
		want := 0
		if key == reg+"/other" {
			want = exitUnauthorize
		}
		r = strata(t, t.TempDir(), "pull", "--docker-config", cfg, ref)
		expectCode(t, "pull with --docker-config key "+key, r, want)
	}

	r = strata(t, t.TempDir(), "pull", "--username", user, ref)
	expectCode(t, "--username without --password-stdin", r, exitUsage)
}

// TestPullInterrupted sends SIGINT while a layer is downloading: strata
// stops, says so, and keeps nothing of the layer.
func TestPullInterrupted(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	layer := makeLayer(t, testimage.Gzip, testimage.File("big", strings.Repeat("z", 1000)))
	blob, err := layer.layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	size, err := layer.layer.Size()
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	var once sync.Once
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+blob.String()) {
				// Send the headers, then stall until the client goes away.
				w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
				w.WriteHeader(http.StatusOK)
				w.(http.Flusher).Flush()
				once.Do(func() { close(started) })
				<-r.Context().Done()
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	ref := reg + "/stall:v1"
	push(t, ref, layer)
	root := t.TempDir()

	cmd := exec.Command(binary, "--root", root, "pull", ref)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the pull never fetched the layer blob\nstderr:\n%s", stderr.String())
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatal("strata did not stop within 30s of SIGINT")
	}
	r := result{stdout: stdout.String(), stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
	expectCode(t, "interrupted pull", r, exitInterrupted)
	if !strings.Contains(r.stderr, "strata: interrupted") {
		t.Errorf("interrupted pull: want %q on stderr, got %q", "strata: interrupted", r.stderr)
	}
	if entries, err := os.ReadDir(filepath.Join(root, "tmp")); err != nil || len(entries) != 0 {
		t.Errorf("interrupted pull: want an empty tmp/, got %v (%v)", entries, err)
	}
	r = strata(t, root, "ls", "--json")
	expectCode(t, "ls after an interrupted pull", r, 0)
	var ls lsJSON
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil || len(ls.Layers) != 0 {
		t.Errorf("ls after an interrupted pull: want no layers, got %s (%v)", r.stdout, err)
	}
}

func TestUsage(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	root := t.TempDir()
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string // wanted on stdout
		stderr string // wanted on stderr
	}{
		{"no command", nil, exitUsage, "", "usage: strata"},
		{"unknown command", []string{"frobnicate"}, exitUsage, "", `unknown command "frobnicate"`},
		{"unknown global flag", []string{"--nope", "ls"}, exitUsage, "", "usage: strata"},
		{"unknown command flag", []string{"ls", "--nope"}, exitUsage, "", "usage: strata ls"},
		{"pull without a reference", []string{"pull"}, exitUsage, "", "usage: strata pull"},
		{"pull with two references", []string{"pull", "a", "b"}, exitUsage, "", "exactly one image reference"},
		{"unknown pull policy", []string{"pull", "--policy", "Sometimes", "a"}, exitUsage, "", "IfNotPresent, Always or Never"},
		{"ls with an argument", []string{"ls", "x"}, exitUsage, "", "takes no arguments"},
		{"help", []string{"--help"}, exitOK, "Exit codes:", ""},
		{"command help", []string{"pull", "--help"}, exitOK, "--policy", ""},
		{"version", []string{"version"}, exitOK, "strata dev\n", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := strata(t, root, tc.args...)
			expectCode(t, strings.Join(tc.args, " "), r, tc.code)
			if !strings.Contains(r.stdout, tc.stdout) || !strings.Contains(r.stderr, tc.stderr) {
				t.Errorf("want %q on stdout and %q on stderr, got %s", tc.stdout, tc.stderr, r)
			}
			if tc.code == exitUsage && !strings.HasPrefix(r.stderr, "strata: ") {
				t.Errorf("want the error on stderr as %q, got %q", "strata: <message>", r.stderr)
			}
		})
	}
}

// TestVersionLdflags checks that the release build's -X flag sets the
// version.
func TestVersionLdflags(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "strata")
	if err := goBuild(bin, "-ldflags", "-X main.version=v1.2.3"); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil || string(out) != "strata v1.2.3\n" {
		t.Errorf("version: want %q, got %q (%v)", "strata v1.2.3\n", out, err)
	}
}

// duLine is a line of du --bytes: a name (of one or two words), a number,
// and a note.
var duLine = regexp.MustCompile(`^(\S+(?: \S+)?) +(\d+)  \S`)

// parseDu reads du --bytes into a map by name.
func parseDu(t *testing.T, out string) map[string]int64 {
	t.Helper()
	du := map[string]int64{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		m := duLine.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("du --bytes: line %q is not NAME NUMBER NOTE", line)
		}
		n, err := strconv.ParseInt(m[2], 10, 64)
		if err != nil {
			t.Fatalf("du --bytes: line %q: %v", line, err)
		}
		du[m[1]] = n
	}
	return du
}
