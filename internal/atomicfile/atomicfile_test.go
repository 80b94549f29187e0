package atomicfile

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// entries lists the names in dir.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestWriteReplacesWithPerm(t *testing.T) {
	// The permissions are the caller's, whatever the umask.
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	for _, opt := range []Options{{}, {Sync: true}, {SyncDir: true}, {Sync: true, SyncDir: true}} {
		t.Run(fmt.Sprintf("%+v", opt), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "rec.json")
			if err := Write(p, []byte("one"), 0o644, opt); err != nil {
				t.Fatal(err)
			}
			if err := Write(p, []byte("two"), 0o640, opt); err != nil {
				t.Fatal(err)
			}
			if got := readFile(t, p); got != "two" {
				t.Errorf("content %q, want %q", got, "two")
			}
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode() != 0o640 {
				t.Errorf("mode %v, want -rw-r-----", st.Mode())
			}
			if got := entries(t, dir); len(got) != 1 {
				t.Errorf("directory holds %q, want only rec.json", got)
			}
		})
	}
}

// TestWriteTempDir: with a TempDir, the temporary file is made there, and
// nothing else appears beside the target.
func TestWriteTempDir(t *testing.T) {
	dir, stage := t.TempDir(), t.TempDir()
	p := filepath.Join(dir, "rec")
	var tmp string
	testHookBeforeRename = func(name string) {
		tmp = name
		if got := entries(t, dir); len(got) != 0 {
			t.Errorf("before the rename, the target's directory holds %q", got)
		}
	}
	defer func() { testHookBeforeRename = nil }()
	if err := Write(p, []byte("x"), 0o600, Options{TempDir: stage}); err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(tmp) != stage || !strings.HasPrefix(filepath.Base(tmp), "rec") {
		t.Errorf("temporary file %s, want rec* in %s", tmp, stage)
	}
	if got := entries(t, stage); len(got) != 0 {
		t.Errorf("stage holds %q after the write", got)
	}
	if got := readFile(t, p); got != "x" {
		t.Errorf("content %q", got)
	}
}

// TestWriteFailureLeavesNothing: a write that fails removes its temporary
// file and leaves the target as it was.
func TestWriteFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	// The rename fails: the target is a directory that is not empty.
	p := filepath.Join(dir, "rec")
	if err := os.MkdirAll(filepath.Join(p, "keep"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := Write(p, []byte("x"), 0o644, Options{Sync: true, SyncDir: true})
	if err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("Write over a directory = %v, want an error naming %s", err, p)
	}
	if got := entries(t, dir); len(got) != 1 || got[0] != "rec" {
		t.Errorf("after a failed write the directory holds %q, want only rec", got)
	}
	if _, err := os.Stat(filepath.Join(p, "keep")); err != nil {
		t.Errorf("the target was touched: %v", err)
	}
	// A missing TempDir: nothing is written.
	q := filepath.Join(dir, "other")
	err = Write(q, []byte("x"), 0o644, Options{TempDir: filepath.Join(dir, "missing")})
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), q) {
		t.Errorf("Write with a missing TempDir = %v, want ErrNotExist naming %s", err, q)
	}
	if _, err := os.Stat(q); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target written after a failure: %v", err)
	}
}

const crashEnv = "ATOMICFILE_CRASH_CHILD"

// TestMain runs the process that TestWriteCrash kills when the environment
// names it.
func TestMain(m *testing.M) {
	if path := os.Getenv(crashEnv); path != "" {
		crashChild(path, os.Getenv(crashEnv+"_STAGE"))
		os.Exit(1) // killed before it gets here
	}
	os.Exit(m.Run())
}

// crashChild writes path, staged in stage, and stops just before the
// rename.
func crashChild(path, stage string) {
	testHookBeforeRename = func(tmp string) {
		fmt.Println("ready " + tmp)
		time.Sleep(time.Hour) // killed here
	}
	// 8 MiB, so that the file is well past one page and one write.
	data := bytes.Repeat([]byte("new "), 2<<20)
	if err := Write(path, data, 0o644, Options{TempDir: stage, Sync: true, SyncDir: true}); err != nil {
		fmt.Println("error", err)
	}
}

// TestWriteCrash kills a process (SIGKILL) in the middle of Write, after
// the new content is all in the temporary file: the target keeps its old
// content, whole; the temporary file is the only debris; the next write and
// read work.
func TestWriteCrash(t *testing.T) {
	for _, staged := range []bool{false, true} {
		t.Run(fmt.Sprintf("staged=%v", staged), func(t *testing.T) {
			dir := t.TempDir()
			stage := ""
			if staged {
				stage = t.TempDir()
			}
			p := filepath.Join(dir, "rec.json")
			if err := WriteJSON(p, map[string]int{"generation": 1}, 0o644, Options{}); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), crashEnv+"="+p, crashEnv+"_STAGE="+stage)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(out).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "ready ") {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("child said %q, %v; want ready", line, err)
			}
			tmp := strings.TrimSpace(strings.TrimPrefix(line, "ready "))
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			_ = cmd.Wait()

			if st, err := os.Stat(tmp); err != nil || st.Size() != 8<<20 {
				t.Fatalf("the killed write left no whole temporary file %s: %v", tmp, err)
			}
			wantDebris := filepath.Dir(tmp)
			if staged && wantDebris != stage || !staged && wantDebris != dir {
				t.Errorf("temporary file in %s", wantDebris)
			}
			var rec map[string]int
			found, err := ReadJSON(p, &rec)
			if !found || err != nil || rec["generation"] != 1 {
				t.Fatalf("after the crash ReadJSON = %v, %v, %v; want the old record", found, err, rec)
			}
			if err := WriteJSON(p, map[string]int{"generation": 2}, 0o644, Options{TempDir: stage}); err != nil {
				t.Fatal(err)
			}
			rec = nil
			if found, err := ReadJSON(p, &rec); !found || err != nil || rec["generation"] != 2 {
				t.Fatalf("after a new write ReadJSON = %v, %v, %v; want the new record", found, err, rec)
			}
		})
	}
}

func TestWriteJSONFormat(t *testing.T) {
	p := filepath.Join(t.TempDir(), "rec.json")
	v := struct {
		Name string   `json:"name"`
		List []string `json:"list"`
	}{"a", []string{"b"}}
	if err := WriteJSON(p, v, 0o600, Options{}); err != nil {
		t.Fatal(err)
	}
	want := "{\n  \"name\": \"a\",\n  \"list\": [\n    \"b\"\n  ]\n}\n"
	if got := readFile(t, p); got != want {
		t.Errorf("WriteJSON wrote %q, want %q", got, want)
	}
	if err := WriteJSON(p, func() {}, 0o600, Options{}); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("WriteJSON of a func = %v, want an error naming %s", err, p)
	}
	if got := readFile(t, p); got != want {
		t.Errorf("a failed WriteJSON changed the file to %q", got)
	}
}

func TestReadJSON(t *testing.T) {
	dir := t.TempDir()
	type rec struct{ N int }

	var r rec
	found, err := ReadJSON(filepath.Join(dir, "missing.json"), &r)
	if found || err != nil {
		t.Errorf("ReadJSON(missing) = %v, %v; want false, nil", found, err)
	}

	good := filepath.Join(dir, "good.json")
	if err := WriteJSON(good, rec{N: 7}, 0o600, Options{}); err != nil {
		t.Fatal(err)
	}
	if found, err := ReadJSON(good, &r); !found || err != nil || r.N != 7 {
		t.Errorf("ReadJSON(good) = %v, %v, %+v; want true, nil, {N:7}", found, err, r)
	}

	// Torn files, as a power failure leaves one written without Sync: the
	// caller gets the decode error and decides.
	for name, content := range map[string]string{"empty": "", "half": `{"N": 1`, "type": `{"N": "x"}`} {
		p := filepath.Join(dir, name+".json")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		found, err := ReadJSON(p, &r)
		var serr *json.SyntaxError
		var terr *json.UnmarshalTypeError
		if !found || err == nil || !strings.Contains(err.Error(), p) || !errors.As(err, &serr) && !errors.As(err, &terr) {
			t.Errorf("ReadJSON(%s) = %v, %v; want true and a JSON error naming the file", name, found, err)
		}
	}

	// A file that cannot be read is not absent.
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	if found, err := ReadJSON(sub, &r); found || !errors.Is(err, syscall.EISDIR) {
		t.Errorf("ReadJSON(a directory) = %v, %v; want false, EISDIR", found, err)
	}
}

func TestSyncDir(t *testing.T) {
	dir := t.TempDir()
	if err := SyncDir(dir); err != nil {
		t.Errorf("SyncDir(%s) = %v", dir, err)
	}
	missing := filepath.Join(dir, "missing")
	if err := SyncDir(missing); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("SyncDir(missing) = %v, want ErrNotExist naming %s", err, missing)
	}
}
