package mount

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseOptions(t *testing.T) {
	for _, tc := range []struct {
		in       []string
		want     []string
		readOnly bool
		err      string
	}{
		{in: nil},
		{in: []string{"defaults", "nosuid", "nodev", "rw", "exec"}},
		{in: []string{"noatime", "noexec"}, want: []string{"noexec", "noatime"}},
		{in: []string{"noatime,noexec, nodiratime"}, want: []string{"noexec", "noatime", "nodiratime"}},
		{in: []string{"strictatime", "relatime"}, want: []string{"relatime"}},
		{in: []string{"noexec", "exec", "nodiratime", "diratime"}},
		{in: []string{"ro"}, readOnly: true},
		{in: []string{"ro", "rw"}},
		{in: []string{"suid"}, err: `"suid" is refused: volumes are always mounted nosuid,nodev`},
		{in: []string{"noatime", "dev"}, err: `"dev" is refused`},
		{in: []string{"lowerdir=/etc"}, err: `mount option "lowerdir=/etc" is not supported: the options that apply to a volume are ro, rw, exec, noexec`},
		{in: []string{"upperdir=/x"}, err: `"upperdir=/x" is not supported`},
		{in: []string{"sync"}, err: `"sync" is not supported`},
	} {
		o, ro, err := ParseOptions(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseOptions(%q) = %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseOptions(%q): %v", tc.in, err)
			continue
		}
		if !slices.Equal(o.List(), tc.want) || ro != tc.readOnly {
			t.Errorf("ParseOptions(%q) = %v, ro %v; want %v, ro %v", tc.in, o.List(), ro, tc.want, tc.readOnly)
		}
	}
}

// assertOptions checks that the mount at target shows every option of want
// in mountinfo (what `mount` in a pod prints), and none of notWant.
func assertOptions(tb testing.TB, target string, want, notWant []string) {
	tb.Helper()
	infos, err := MountsUnder(target)
	if err != nil || len(infos) == 0 {
		tb.Fatalf("MountsUnder(%s) = %v, %v", target, infos, err)
	}
	opts := infos[len(infos)-1].MountOptions
	for _, o := range want {
		if !slices.Contains(opts, o) {
			tb.Errorf("mount at %s has options %v, lacking %s", target, opts, o)
		}
	}
	for _, o := range notWant {
		if slices.Contains(opts, o) {
			tb.Errorf("mount at %s has options %v, with %s", target, opts, o)
		}
	}
}

// assertNoExec checks that a program on the mount at dir cannot run.
func assertNoExec(tb testing.TB, dir string, noexec bool) {
	tb.Helper()
	prog := filepath.Join(dir, "prog.sh")
	_, err := exec.Command(prog).Output()
	if noexec && (err == nil || !strings.Contains(err.Error(), "permission denied")) {
		tb.Errorf("running %s on a noexec mount: %v, want permission denied", prog, err)
	}
	if !noexec && err != nil {
		tb.Errorf("running %s: %v", prog, err)
	}
}

func TestOverlayOptions(t *testing.T) {
	requireRoot(t)
	opts := Options{NoExec: true, Atime: "noatime", NoDirAtime: true}
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			l1, l2 := mkdir(t, d+"/l1"), mkdir(t, d+"/l2")
			if err := os.WriteFile(l1+"/prog.sh", []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			upper, work := mkdir(t, d+"/u"), mkdir(t, d+"/w")
			plain, target := mkdir(t, d+"/plain"), mkdir(t, d+"/m")
			mountOverlayT(t, Overlay{Lowers: []string{l2, l1}, Upper: upper, Work: work}, plain)
			assertNoExec(t, plain, false)
			mountOverlayT(t, Overlay{Lowers: []string{l2, l1}, Upper: mkdir(t, d+"/u2"), Work: mkdir(t, d+"/w2"), Options: opts}, target)
			assertFlags(t, target, false)
			assertOptions(t, target, []string{"noexec", "noatime", "nodiratime"}, nil)
			assertNoExec(t, target, true)
		})
	}
	t.Run("single-lower-bind", func(t *testing.T) {
		d := t.TempDir()
		l1, target := mkdir(t, d+"/l1"), mkdir(t, d+"/m")
		writeFile(t, l1+"/prog.sh", "#!/bin/sh\nexit 0\n")
		if err := os.Chmod(l1+"/prog.sh", 0o755); err != nil {
			t.Fatal(err)
		}
		mountOverlayT(t, Overlay{Lowers: []string{l1}, Options: Options{NoExec: true, Atime: "strictatime"}}, target)
		assertFlags(t, target, true)
		assertOptions(t, target, []string{"noexec"}, []string{"relatime", "noatime"})
		assertNoExec(t, target, true)
	})
}

func TestBindBeneathOptions(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	src, target := mkdir(t, d+"/src/sub"), mkdir(t, d+"/m")
	writeFile(t, src+"/prog.sh", "#!/bin/sh\nexit 0\n")
	if err := os.Chmod(src+"/prog.sh", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := BindBeneath(d+"/src", "sub", target, false, Options{NoExec: true, Atime: "noatime"}); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	assertFlags(t, target, false)
	assertOptions(t, target, []string{"noexec", "noatime"}, []string{"relatime"})
	assertNoExec(t, target, true)
	assertContent(t, target+"/prog.sh", "#!/bin/sh\nexit 0\n")
}
