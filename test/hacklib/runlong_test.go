package hacklib

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lib is the path of hack/lib.sh.
func lib(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot find the test's source file")
	}
	p, err := filepath.Abs(filepath.Join(filepath.Dir(file), "..", "..", "hack", "lib.sh"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// script writes a bash script that runs under set -euo pipefail with
// hack/lib.sh sourced and body after it, and returns its path and the path
// of a log file for run_long in the same temp dir.
func script(t *testing.T, body string) (path, log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "step.log")
	path = filepath.Join(dir, "s.sh")
	src := fmt.Sprintf("set -euo pipefail\n. %q\nLOG=%q\nDIR=%q\n%s\n", lib(t), log, dir, body)
	if err := os.WriteFile(path, []byte(src), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, log
}

// result is what a script printed and how it ended.
type result struct {
	stdout, stderr string
	code           int
	took           time.Duration
}

// run runs a script to its end with STRATA_HEARTBEAT=heartbeat ("" leaves
// it unset).
func run(t *testing.T, path, heartbeat string) result {
	t.Helper()
	cmd := exec.Command("bash", path)
	cmd.Env = env(heartbeat)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("bash %s: %v", path, err)
	}
	return r
}

func env(heartbeat string) []string {
	var e []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRATA_HEARTBEAT=") && !strings.HasPrefix(kv, "RUN_LONG_PREFIX=") {
			e = append(e, kv)
		}
	}
	if heartbeat != "" {
		e = append(e, "STRATA_HEARTBEAT="+heartbeat)
	}
	return e
}

var heartbeatLine = regexp.MustCompile(`^  \.\.\. (.*): (\d+)s$`)

// heartbeats returns the elapsed seconds of the heartbeat lines of what.
func heartbeats(stderr, what string) []int {
	var got []int
	for _, l := range strings.Split(stderr, "\n") {
		if m := heartbeatLine.FindStringSubmatch(l); m != nil && m[1] == what {
			n, _ := strconv.Atoi(m[2])
			got = append(got, n)
		}
	}
	return got
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHeartbeat: a step of 2.5 s with a heartbeat every second says what
// it runs, how long it takes and where its output goes, prints exactly two
// heartbeats (at 1 s and 2 s; a 65 s build with the default 30 s prints
// two as well), then "done"; the command's output (a go build's `go:
// downloading` lines) is in the log, not on the terminal, and the script
// goes on.
func TestHeartbeat(t *testing.T) {
	t.Parallel()
	path, log := script(t, `
build() { echo "go: downloading example.com/m v1.0.0"; echo "to stderr" >&2; sleep 2.5; }
run_long "building m" "about 3 s" "$LOG" build
echo after`)
	r := run(t, path, "1")
	if r.code != 0 {
		t.Fatalf("exit status %d, want 0; stderr:\n%s", r.code, r.stderr)
	}
	if got := heartbeats(r.stderr, "building m"); fmt.Sprint(got) != "[1 2]" {
		t.Errorf("heartbeats at %v s, want [1 2]; stderr:\n%s", got, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if want := "building m (about 3 s; output in " + log + ")"; lines[0] != want {
		t.Errorf("first line %q, want %q", lines[0], want)
	}
	if want := "  building m: done in 2s"; lines[len(lines)-1] != want {
		t.Errorf("last line %q, want %q", lines[len(lines)-1], want)
	}
	if r.stdout != "after\n" {
		t.Errorf("stdout %q, want only the script's own %q", r.stdout, "after\n")
	}
	if strings.Contains(r.stderr, "downloading") || strings.Contains(r.stderr, "to stderr") {
		t.Errorf("the command's output reached the terminal:\n%s", r.stderr)
	}
	l := readFile(t, log)
	if !strings.Contains(l, "go: downloading example.com/m v1.0.0\n") || !strings.Contains(l, "to stderr\n") {
		t.Errorf("log lacks the command's stdout and stderr:\n%s", l)
	}
}

// TestLogNamedOnce: steps that share a log name it at the first only.
func TestLogNamedOnce(t *testing.T) {
	t.Parallel()
	path, log := script(t, `
run_long "first" "quick" "$LOG" true
run_long "second" "quick" "$LOG" true
run_long "third" "quick" "$DIR/other.log" true`)
	r := run(t, path, "1")
	want := "first (quick; output in " + log + ")\n  first: done in 0s\n" +
		"second (quick)\n  second: done in 0s\n" +
		"third (quick; output in " + filepath.Join(filepath.Dir(log), "other.log") + ")\n  third: done in 0s\n"
	if r.code != 0 || r.stderr != want {
		t.Errorf("exit status %d, stderr:\n%s\nwant:\n%s", r.code, r.stderr, want)
	}
}

// TestDefaultInterval: without STRATA_HEARTBEAT the heartbeat comes every
// 30 s, so a step of 1.5 s prints none.
func TestDefaultInterval(t *testing.T) {
	t.Parallel()
	path, _ := script(t, `run_long "short" "1.5 s" "$LOG" sleep 1.5`)
	r := run(t, path, "")
	if r.code != 0 {
		t.Fatalf("exit status %d; stderr:\n%s", r.code, r.stderr)
	}
	if got := heartbeats(r.stderr, "short"); len(got) != 0 {
		t.Errorf("heartbeats at %v s with the default interval, want none; stderr:\n%s", got, r.stderr)
	}
}

// TestFailure: a failing step's exit status comes back to the caller, with
// the last 40 lines of its log on the terminal (not the 10 before) and the
// log's path; a process it left running is killed.
func TestFailure(t *testing.T) {
	t.Parallel()
	path, log := script(t, `
fail() { sleep 30 & echo $! >"$DIR/left.pid"; for i in $(seq 50); do echo "line $i"; done; return 3; }
rc=0
run_long "failing step" "quick" "$LOG" fail || rc=$?
echo "rc=$rc"`)
	r := run(t, path, "1")
	if r.code != 0 || r.stdout != "rc=3\n" {
		t.Fatalf("exit status %d, stdout %q; want 0 and rc=3; stderr:\n%s", r.code, r.stdout, r.stderr)
	}
	for i := 11; i <= 50; i++ {
		if !strings.Contains(r.stderr, fmt.Sprintf("    | line %d\n", i)) {
			t.Errorf("line %d of the log is not shown", i)
		}
	}
	if strings.Contains(r.stderr, "| line 10\n") {
		t.Errorf("more than the last 40 lines shown:\n%s", r.stderr)
	}
	if !strings.Contains(r.stderr, "failing step: FAILED (exit status 3)") ||
		!strings.Contains(r.stderr, "the whole output is in "+log) {
		t.Errorf("the failure or the log's path is not named:\n%s", r.stderr)
	}
	waitGone(t, readFile(t, filepath.Join(filepath.Dir(log), "left.pid")))
}

// TestSetE: under set -e a failing step without `|| ...` ends the script
// with the step's exit status, and one that succeeds lets it go on.
func TestSetE(t *testing.T) {
	t.Parallel()
	path, _ := script(t, `
run_long "fine" "quick" "$LOG" true
echo "after fine"
run_long "broken" "quick" "$LOG" sh -c 'exit 4'
echo "not reached"`)
	r := run(t, path, "1")
	if r.code != 4 || r.stdout != "after fine\n" {
		t.Errorf("exit status %d, stdout %q; want 4 and only %q; stderr:\n%s", r.code, r.stdout, "after fine\n", r.stderr)
	}
}

// TestSignal: Ctrl-C (SIGINT) or SIGTERM while a step runs kills the
// step's whole process group (the command and what it started), and the
// script dies of the signal (128+n), its EXIT trap run; a caller's own trap
// for the signal is put back and runs.
func TestSignal(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		sig        syscall.Signal
		callerTrap bool
		want       int
	}{
		{"SIGINT", syscall.SIGINT, false, 130},
		{"SIGTERM", syscall.SIGTERM, false, 143},
		{"SIGINT with the caller's trap", syscall.SIGINT, true, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			body := `
trap 'echo "exit trap" >"$DIR/exit-trap"' EXIT
long() { sleep 30 & echo $! >"$DIR/child.pid"; sleep 31; }
run_long "long step" "forever" "$LOG" long
echo "not reached"`
			if tc.callerTrap {
				body = `trap 'echo "caller trap"; exit 7' INT` + body
			}
			path, log := script(t, body)
			dir := filepath.Dir(log)
			// A script started in the background by a shell without job
			// control starts with SIGINT ignored, and bash cannot undo
			// that: env gives it the default, as a terminal's would be.
			cmd := exec.Command("env", "--default-signal=INT,TERM", "bash", path)
			cmd.Env = env("1")
			var out bytes.Buffer
			cmd.Stdout = &out
			stderr, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Signal after the first heartbeat: the step is running.
			lines := make(chan string, 100)
			go func() {
				sc := bufio.NewScanner(stderr)
				for sc.Scan() {
					lines <- sc.Text()
				}
				close(lines)
			}()
			var seen []string
			timeout := time.After(10 * time.Second)
		wait:
			for {
				select {
				case l, ok := <-lines:
					if !ok {
						t.Fatalf("the script ended before its first heartbeat:\n%s", strings.Join(seen, "\n"))
					}
					seen = append(seen, l)
					if heartbeatLine.MatchString(l) {
						break wait
					}
				case <-timeout:
					t.Fatalf("no heartbeat within 10 s:\n%s", strings.Join(seen, "\n"))
				}
			}
			child := readFile(t, filepath.Join(dir, "child.pid"))
			start := time.Now()
			if err := cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			for l := range lines {
				seen = append(seen, l)
			}
			err = cmd.Wait()
			took := time.Since(start)
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				}
			}
			if code != tc.want {
				t.Errorf("exit status %d after %s, want %d; stderr:\n%s", code, tc.sig, tc.want, strings.Join(seen, "\n"))
			}
			if took > 3*time.Second {
				t.Errorf("the script took %s to stop after %s", took, tc.sig)
			}
			if !strings.Contains(strings.Join(seen, "\n"), "long step: interrupted (SIG") {
				t.Errorf("the interruption is not said:\n%s", strings.Join(seen, "\n"))
			}
			if strings.Contains(out.String(), "not reached") {
				t.Errorf("the script went on after %s", tc.sig)
			}
			if tc.callerTrap && !strings.Contains(out.String(), "caller trap") {
				t.Errorf("the caller's INT trap did not run; stdout %q", out.String())
			}
			if _, err := os.Stat(filepath.Join(dir, "exit-trap")); err != nil {
				t.Errorf("the script's EXIT trap did not run: %v", err)
			}
			waitGone(t, child)
		})
	}
}

// waitGone fails unless the process of the pid in pidText is gone (or a
// zombie) within 3 s.
func waitGone(t *testing.T, pidText string) {
	t.Helper()
	pid, err := strconv.Atoi(strings.TrimSpace(pidText))
	if err != nil {
		t.Fatalf("pid file: %q", pidText)
	}
	for end := time.Now().Add(3 * time.Second); ; {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(stat), ") Z ") {
			return
		}
		if time.Now().After(end) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("process %d the step started still runs: %s", pid, stat)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFmtDuration: the heartbeat's elapsed time.
func TestFmtDuration(t *testing.T) {
	t.Parallel()
	path, _ := script(t, `for s in 0 59 60 125 3599 3600 3723; do echo "$s $(fmt_duration $s)"; done`)
	r := run(t, path, "")
	want := "0 0s\n59 59s\n60 1m00s\n125 2m05s\n3599 59m59s\n3600 1h00m00s\n3723 1h02m03s\n"
	if r.code != 0 || r.stdout != want {
		t.Errorf("got %q (exit %d), want %q", r.stdout, r.code, want)
	}
}
