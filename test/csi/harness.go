// Package csitest drives the real strata-csi binary the way kubelet does: it
// builds the plugin once, starts it on a unix socket with its own state root,
// talks CSI to it over gRPC, restarts or SIGKILLs it, and cleans up every
// mount a test leaves behind.
//
// The integration tests of this directory use it, and so does the csi-sanity
// suite in test/sanity. Everything here needs root: the plugin mounts.
package csitest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// PluginPackage is the import path of the plugin binary.
const PluginPackage = "github.com/strata-csi/strata/cmd/strata-csi"

// goTool is the go command on PATH: go test puts its own GOROOT/bin first
// there, so the plugin is built by the toolchain that runs the test.
const goTool = "go"

// BuildPlugin builds cmd/strata-csi into dir and returns the binary's path.
// Plugin reports any race the plugin logs as a test failure.
func BuildPlugin(dir string) (string, error) {
	bin := filepath.Join(dir, "strata-csi")
	return bin, BuildCommand(PluginPackage, bin)
}

// BuildCommand builds the main package pkg into the file out, with extra go
// build flags. When the test binary runs with the race detector, so does the
// command: it finds the command's races, and the build finds every
// dependency already compiled for the test itself.
func BuildCommand(pkg, out string, flags ...string) error {
	args := append([]string{"build", "-o", out}, flags...)
	if RaceEnabled {
		args = append(args, "-race")
	}
	args = append(args, pkg)
	if b, err := exec.Command(goTool, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return nil
}

// RequireRoot fails the test at once unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this suite mounts overlays and must run as root (sudo go test ...)")
	}
}

// Options configure a plugin process.
type Options struct {
	Bin    string   // the strata-csi binary (BuildPlugin)
	Root   string   // --root
	Mode   string   // --mode; "node" if empty
	NodeID string   // --node-id; "test-node" if empty
	Args   []string // more flags
}

// Plugin is one running strata-csi process and a CSI client connected to it.
type Plugin struct {
	t    testing.TB
	opts Options
	// Sock is the unix socket path; Endpoint is "unix://"+Sock.
	Sock, Endpoint string
	// LogPath collects the plugin's stderr across restarts.
	LogPath string
	raceDir string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	conn *grpc.ClientConn

	Identity   csi.IdentityClient
	Node       csi.NodeClient
	Controller csi.ControllerClient
}

// Start starts the plugin and waits until Probe reports it ready. The
// process is stopped (SIGTERM) at the end of the test; if the test failed,
// the plugin's log is printed.
func Start(t testing.TB, o Options) *Plugin {
	t.Helper()
	if o.Mode == "" {
		o.Mode = "node"
	}
	if o.NodeID == "" {
		o.NodeID = "test-node"
	}
	// Socket paths are limited to 108 bytes: keep them out of long test
	// names.
	sockDir, err := os.MkdirTemp("", "strata-sock-")
	if err != nil {
		t.Fatal(err)
	}
	logDir, err := os.MkdirTemp("", "strata-log-")
	if err != nil {
		t.Fatal(err)
	}
	p := &Plugin{
		t: t, opts: o,
		Sock:    filepath.Join(sockDir, "csi.sock"),
		LogPath: filepath.Join(logDir, "strata-csi.log"),
		raceDir: filepath.Join(logDir, "race"),
	}
	p.Endpoint = "unix://" + p.Sock
	if err := os.Mkdir(p.raceDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop()
		if races := p.raceReports(); races != "" {
			t.Errorf("the plugin's race detector reported:\n%s", races)
		}
		if t.Failed() {
			p.DumpLog()
		}
		_ = os.RemoveAll(sockDir)
		_ = os.RemoveAll(logDir)
	})
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	return p
}

// DumpLog writes the plugin's log to the test log.
func (p *Plugin) DumpLog() {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		p.t.Logf("plugin log: %v", err)
		return
	}
	p.t.Logf("strata-csi log (%s):\n%s", p.LogPath, data)
}

func (p *Plugin) raceReports() string {
	entries, _ := os.ReadDir(p.raceDir)
	var b strings.Builder
	for _, e := range entries {
		data, _ := os.ReadFile(filepath.Join(p.raceDir, e.Name()))
		b.Write(data)
	}
	return b.String()
}

func (p *Plugin) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	logf, err := os.OpenFile(p.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logf, "===== start %s\n", time.Now().Format(time.RFC3339Nano))
	args := append([]string{
		"--mode=" + p.opts.Mode,
		"--endpoint", p.Endpoint,
		"--node-id", p.opts.NodeID,
		"--root", p.opts.Root,
		"--v=4",
	}, p.opts.Args...)
	cmd := exec.Command(p.opts.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "GORACE=log_path="+filepath.Join(p.raceDir, "report"))
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.opts.Bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	p.cmd, p.done = cmd, done

	conn, err := grpc.NewClient("unix://"+p.Sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	p.conn = conn
	p.Identity = csi.NewIdentityClient(conn)
	p.Node = csi.NewNodeClient(conn)
	p.Controller = csi.NewControllerClient(conn)

	deadline := time.Now().Add(60 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("strata-csi exited during start (%v); log:\n%s", cmd.ProcessState, readFile(p.LogPath))
		default:
		}
		if _, err := os.Stat(p.Sock); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			resp, err := p.Identity.Probe(ctx, &csi.ProbeRequest{})
			cancel()
			if err == nil && resp.GetReady().GetValue() {
				return nil
			}
			lastErr = err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("strata-csi not ready after 60s (last probe error: %v); log:\n%s", lastErr, readFile(p.LogPath))
}

func readFile(p string) string {
	data, err := os.ReadFile(p)
	if err != nil {
		return err.Error()
	}
	return string(data)
}

// signal sends sig and waits for the process to end (SIGKILL after 30s).
func (p *Plugin) signal(sig syscall.Signal) {
	p.mu.Lock()
	cmd, done, conn := p.cmd, p.done, p.conn
	p.cmd, p.conn = nil, nil
	p.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		p.t.Errorf("strata-csi did not exit within 30s of %v; killing it", sig)
		_ = cmd.Process.Kill()
		<-done
	}
}

// Stop ends the plugin with SIGTERM, as a DaemonSet rollout does.
func (p *Plugin) Stop() { p.signal(syscall.SIGTERM) }

// Kill9 ends the plugin with SIGKILL: no cleanup code of its own runs.
func (p *Plugin) Kill9() { p.signal(syscall.SIGKILL) }

// Restart stops the plugin with SIGTERM and starts it again on the same
// root and socket; it returns once the new process reports ready.
func (p *Plugin) Restart() {
	p.t.Helper()
	p.Stop()
	if err := p.start(); err != nil {
		p.t.Fatal(err)
	}
}

// StartAgain starts the plugin after Kill9 or Stop.
func (p *Plugin) StartAgain() {
	p.t.Helper()
	if err := p.start(); err != nil {
		p.t.Fatal(err)
	}
}

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	MountPoint string
	Root       string
	FsType     string
	Source     string
	Options    []string // per-mount options (ro, nosuid, nodev, ...)
	SuperOpts  string   // per-superblock options (lowerdir=..., upperdir=...)
}

// HasOption reports whether the per-mount options include opt.
func (m Mount) HasOption(opt string) bool {
	for _, o := range m.Options {
		if o == opt {
			return true
		}
	}
	return false
}

// Mounts parses /proc/self/mountinfo.
func Mounts() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseMountinfo(f)
}

// ParseMountinfo parses a mount table in /proc/PID/mountinfo's format (of
// another mount namespace, say). Lines can be very long (an overlay of
// hundreds of layers), so the scanner's buffer is large.
func ParseMountinfo(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// id parent major:minor root mountpoint options [optional...] - fstype source superopts
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 6 || sep < 0 || sep+2 >= len(fields) {
			continue
		}
		m := Mount{
			Root:       unescape(fields[3]),
			MountPoint: unescape(fields[4]),
			Options:    strings.Split(fields[5], ","),
			FsType:     fields[sep+1],
			Source:     unescape(fields[sep+2]),
		}
		if sep+3 < len(fields) {
			m.SuperOpts = fields[sep+3]
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, ok := octal(s[i+1 : i+4]); ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func octal(s string) (byte, bool) {
	if len(s) != 3 {
		return 0, false
	}
	var v int
	for _, c := range []byte(s) {
		if c < '0' || c > '7' {
			return 0, false
		}
		v = v*8 + int(c-'0')
	}
	return byte(v), v < 256
}

// MountsAt returns the mounts whose mount point is exactly path, bottom
// first.
func MountsAt(t testing.TB, path string) []Mount {
	t.Helper()
	all, err := Mounts()
	if err != nil {
		t.Fatal(err)
	}
	path = filepath.Clean(path)
	var out []Mount
	for _, m := range all {
		if m.MountPoint == path {
			out = append(out, m)
		}
	}
	return out
}

// MountsUnder returns the mounts at or below dir.
func MountsUnder(dir string) ([]Mount, error) {
	all, err := Mounts()
	if err != nil {
		return nil, err
	}
	dir = filepath.Clean(dir)
	var out []Mount
	for _, m := range all {
		if m.MountPoint == dir || strings.HasPrefix(m.MountPoint, dir+"/") {
			out = append(out, m)
		}
	}
	return out, nil
}

// UnmountAll detaches every mount at or below dir, deepest first, until none
// is left.
func UnmountAll(dir string) error {
	for range 100 {
		ms, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(ms) == 0 {
			return nil
		}
		sort.SliceStable(ms, func(i, j int) bool {
			return strings.Count(ms[i].MountPoint, "/") > strings.Count(ms[j].MountPoint, "/")
		})
		for _, m := range ms {
			if err := unix.Unmount(m.MountPoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("umount %s: %w", m.MountPoint, err)
			}
		}
	}
	return fmt.Errorf("mounts under %s keep coming back", dir)
}

// CleanupMounts registers a cleanup that unmounts everything under dir. Call
// it right after creating dir (t.TempDir), so that it runs before dir is
// removed.
func CleanupMounts(t testing.TB, dir string) {
	t.Cleanup(func() {
		if ms, _ := MountsUnder(dir); len(ms) > 0 && !t.Failed() {
			var names []string
			for _, m := range ms {
				names = append(names, m.MountPoint)
			}
			t.Logf("cleanup: unmounting what the test left: %s", strings.Join(names, ", "))
		}
		if err := UnmountAll(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}
