package mount

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestProbeFindsNewestAPI(t *testing.T) {
	requireRoot(t)
	// This VM runs 6.18: lowerdir+ by fd exists. If this fails on a newer
	// test host, the probe is wrong, not the kernel.
	if got := probeAPI(); got != apiFd {
		t.Errorf("probeAPI() = %v, want %v on this kernel", got, apiFd)
	}
}

// TestOverlayThreeLayersWithUpper checks the merged view (upper wins, a
// whiteout hides, an opaque dir hides) and copy-up, on every API.
func TestOverlayThreeLayersWithUpper(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			top, mid, bot := mkdir(t, d+"/top"), mkdir(t, d+"/mid"), mkdir(t, d+"/bot")
			upper, work, target := mkdir(t, d+"/upper"), mkdir(t, d+"/work"), mkdir(t, d+"/merged")

			writeFile(t, bot+"/a.txt", "bottom-a")
			writeFile(t, bot+"/b.txt", "bottom-b")
			writeFile(t, bot+"/gone.txt", "must be hidden")
			writeFile(t, bot+"/dir/x", "must be hidden by opaque")
			writeFile(t, bot+"/keep/k", "bottom-k")

			writeFile(t, mid+"/a.txt", "middle-a")
			writeFile(t, mid+"/t.txt", "middle-t")
			whiteout(t, mid+"/gone.txt")
			writeFile(t, mid+"/dir/z", "middle-z")
			opaque(t, mid+"/dir")

			writeFile(t, top+"/a.txt", "top-a")
			writeFile(t, top+"/t.txt", "top-t")
			writeFile(t, top+"/c.txt", "top-c")

			writeFile(t, upper+"/a.txt", "upper-a")

			mountOverlayT(t, Overlay{Lowers: []string{top, mid, bot}, Upper: upper, Work: work}, target)
			assertMountPoint(t, target, true)
			assertFlags(t, target, false)

			assertContent(t, target+"/a.txt", "upper-a")
			assertContent(t, target+"/t.txt", "top-t")
			assertContent(t, target+"/b.txt", "bottom-b")
			assertContent(t, target+"/c.txt", "top-c")
			assertContent(t, target+"/keep/k", "bottom-k")
			assertMissing(t, target+"/gone.txt")
			assertContent(t, target+"/dir/z", "middle-z")
			assertMissing(t, target+"/dir/x")
			ents, err := os.ReadDir(target + "/dir")
			if err != nil || len(ents) != 1 {
				t.Errorf("opaque dir: entries %v, err %v; want only z", ents, err)
			}

			// Writes go to the upper, lowers stay as they were.
			writeFile(t, target+"/new.txt", "new")
			writeFile(t, target+"/b.txt", "changed-b")
			if err := os.Remove(target + "/c.txt"); err != nil {
				t.Fatal(err)
			}
			assertContent(t, upper+"/new.txt", "new")
			assertContent(t, upper+"/b.txt", "changed-b")
			assertContent(t, target+"/b.txt", "changed-b")
			assertMissing(t, target+"/c.txt")
			var st unix.Stat_t
			if err := unix.Lstat(upper+"/c.txt", &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
				t.Errorf("upper/c.txt: want a 0/0 whiteout, got mode %o rdev %d err %v", st.Mode, st.Rdev, err)
			}
			assertContent(t, bot+"/b.txt", "bottom-b")
			assertContent(t, top+"/c.txt", "top-c")
			assertMissing(t, top+"/new.txt")
			assertMissing(t, mid+"/new.txt")
			assertMissing(t, bot+"/new.txt")

			if err := Unmount(target); err != nil {
				t.Fatal(err)
			}
			assertMountPoint(t, target, false)
		})
	}
}

func TestOverlayReadOnlyNoUpper(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			top, bot, target := mkdir(t, d+"/top"), mkdir(t, d+"/bot"), mkdir(t, d+"/merged")
			writeFile(t, top+"/f", "top")
			writeFile(t, bot+"/f", "bottom")
			writeFile(t, bot+"/g", "bottom-g")
			// ReadOnly false on purpose: no upper means read-only anyway.
			mountOverlayT(t, Overlay{Lowers: []string{top, bot}}, target)
			assertContent(t, target+"/f", "top")
			assertContent(t, target+"/g", "bottom-g")
			assertEROFS(t, target+"/f")
			assertEROFS(t, target+"/new")
			assertFlags(t, target, true)
		})
	}
}

func TestOverlayUpperMountedReadOnly(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	l1, l2, upper, work, target := mkdir(t, d+"/l1"), mkdir(t, d+"/l2"), mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
	writeFile(t, upper+"/u", "upper")
	mountOverlayT(t, Overlay{Lowers: []string{l1, l2}, Upper: upper, Work: work, ReadOnly: true}, target)
	assertContent(t, target+"/u", "upper")
	assertEROFS(t, target+"/new")
	assertFlags(t, target, true)
}

func TestOverlaySingleLowerIsReadOnlyBind(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			l, target := mkdir(t, d+"/l"), mkdir(t, d+"/m")
			writeFile(t, l+"/f", "only")
			mountOverlayT(t, Overlay{Lowers: []string{l}}, target)
			assertMountPoint(t, target, true)
			assertContent(t, target+"/f", "only")
			assertEROFS(t, target+"/f")
			assertEROFS(t, target+"/new")
			assertFlags(t, target, true)
			assertContent(t, l+"/f", "only")
		})
	}
}

func TestOverlaySingleLowerWithUpper(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	l, upper, work, target := mkdir(t, d+"/l"), mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
	writeFile(t, l+"/f", "lower")
	mountOverlayT(t, Overlay{Lowers: []string{l}, Upper: upper, Work: work}, target)
	assertContent(t, target+"/f", "lower")
	writeFile(t, target+"/f", "new")
	assertContent(t, upper+"/f", "new")
	assertContent(t, l+"/f", "lower")
}

// longLayers makes n lower dirs whose paths are at least minLen bytes long
// (like /var/lib/strata/layers/sha256/<64 hex>/fs and longer). Layer i holds
// layer-i (content i) and "top" (content i). They are returned top first:
// layer 0 is the top layer.
func longLayers(tb testing.TB, n, minLen int) []string {
	tb.Helper()
	base := tb.TempDir()
	// pad the directory so that base/pad/<64 hex>/fs is minLen bytes; a
	// name is at most 255 bytes, so the padding is cut in 100-byte names.
	padLen := max(minLen-len(base)-1-64-3, 2)
	pad := base
	for padLen > 0 {
		k := min(padLen, 100)
		if padLen-k == 1 { // keep every piece at least 1 byte plus its slash
			k--
		}
		pad += "/" + strings.Repeat("p", k-1)
		padLen -= k
	}
	lowers := make([]string, n)
	for i := range n {
		dir := fmt.Sprintf("%s/%064x/fs", pad, i)
		writeFile(tb, fmt.Sprintf("%s/layer-%d", dir, i), fmt.Sprint(i))
		writeFile(tb, dir+"/top", fmt.Sprint(i))
		lowers[i] = dir
	}
	if len(lowers[0]) < minLen {
		tb.Fatalf("layer path %d bytes, want >= %d", len(lowers[0]), minLen)
	}
	return lowers
}

func checkDeepStack(t *testing.T, target string, n int) {
	t.Helper()
	assertContent(t, target+"/top", "0")
	ents, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != n+1 {
		t.Errorf("merged dir has %d entries, want %d", len(ents), n+1)
	}
	for i := range n {
		b, err := os.ReadFile(fmt.Sprintf("%s/layer-%d", target, i))
		if err != nil || string(b) != fmt.Sprint(i) {
			t.Fatalf("layer-%d: %q, %v", i, b, err)
		}
	}
	// mountinfo lines of deep stacks are huge; the parser must cope.
	infos, err := MountsUnder(target)
	if err != nil {
		t.Fatalf("MountsUnder: %v", err)
	}
	if len(infos) != 1 || infos[0].FsType != "overlay" || infos[0].MountPoint != target {
		t.Errorf("MountsUnder(%s) = %+v, want one overlay", target, infos)
	}
}

func TestOverlayDeepStacks(t *testing.T) {
	requireRoot(t)
	for _, api := range []overlayAPI{apiFd, apiString} {
		for _, n := range []int{300, 500} {
			t.Run(fmt.Sprintf("%v/layers=%d", api, n), func(t *testing.T) {
				forceAPI(t, api)
				lowers := longLayers(t, n, 152)
				d := t.TempDir()
				upper, work, target := mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
				mountOverlayT(t, Overlay{Lowers: lowers, Upper: upper, Work: work}, target)
				checkDeepStack(t, target, n)
				writeFile(t, target+"/top", "written")
				assertContent(t, upper+"/top", "written")
				assertContent(t, lowers[0]+"/top", "0")
			})
			t.Run(fmt.Sprintf("%v/layers=%d/readonly", api, n), func(t *testing.T) {
				forceAPI(t, api)
				lowers := longLayers(t, n, 152)
				target := mkdir(t, t.TempDir()+"/m")
				mountOverlayT(t, Overlay{Lowers: lowers}, target)
				checkDeepStack(t, target, n)
				assertEROFS(t, target+"/top")
			})
		}
	}
}

func TestOverlayTooManyLayers(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	lowers := make([]string, MaxLowers+1)
	for i := range lowers {
		lowers[i] = mkdir(t, fmt.Sprintf("%s/l%d", d, i))
	}
	target := mkdir(t, d+"/m")
	for _, o := range []Overlay{
		{Lowers: lowers},
		{Lowers: lowers, Upper: mkdir(t, d+"/u"), Work: mkdir(t, d+"/w")},
	} {
		err := MountOverlay(o, target)
		if !errors.Is(err, ErrTooManyLayers) {
			cleanupUnmount(t, target)
			t.Fatalf("MountOverlay(501 layers) = %v, want ErrTooManyLayers", err)
		}
		if msg := err.Error(); !strings.Contains(msg, "501") || !strings.Contains(msg, "500") {
			t.Errorf("error %q should name the count (501) and the cap (500)", msg)
		}
		assertMountPoint(t, target, false)
	}
}

// TestOverlayPathsLongerThanFsconfigString: a layer path longer than the
// 255-byte cap of an fsconfig string value still mounts, on every API.
func TestOverlayPathsLongerThanFsconfigString(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			lowers := longLayers(t, 3, 400)
			d := t.TempDir()
			upperBase := d + "/" + strings.Repeat("u", 150) + "/" + strings.Repeat("v", 150)
			upper, work, target := mkdir(t, upperBase+"/upper"), mkdir(t, upperBase+"/work"), mkdir(t, d+"/m")
			mountOverlayT(t, Overlay{Lowers: lowers, Upper: upper, Work: work}, target)
			checkDeepStack(t, target, 3)
		})
	}
}

// TestClassicFallback: mount(2) with /proc/self/fd paths holds a couple of
// hundred layers; past 4095 bytes of options it must refuse, never mount a
// truncated (wrong) stack.
func TestClassicFallback(t *testing.T) {
	requireRoot(t)
	forceAPI(t, apiClassic)
	t.Run("fits/layers=200", func(t *testing.T) {
		lowers := longLayers(t, 200, 152)
		d := t.TempDir()
		upper, work, target := mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
		mountOverlayT(t, Overlay{Lowers: lowers, Upper: upper, Work: work}, target)
		// Every layer, the bottom one included, is there: nothing was cut.
		checkDeepStack(t, target, 200)
	})
	t.Run("too-long/layers=300", func(t *testing.T) {
		lowers := longLayers(t, 300, 152)
		d := t.TempDir()
		upper, work, target := mkdir(t, d+"/u"), mkdir(t, d+"/w"), mkdir(t, d+"/m")
		err := MountOverlay(Overlay{Lowers: lowers, Upper: upper, Work: work}, target)
		if err == nil {
			cleanupUnmount(t, target)
		}
		if !errors.Is(err, ErrTooManyLayers) {
			t.Fatalf("classic mount of 300 layers = %v, want ErrTooManyLayers", err)
		}
		if msg := err.Error(); !strings.Contains(msg, "300") || !strings.Contains(msg, "4095") {
			t.Errorf("error %q should name the layer count and the 4095-byte limit", msg)
		}
		assertMountPoint(t, target, false)
		t.Logf("error: %v", err)
	})
}

func TestOverlayErrors(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			l1, target := mkdir(t, d+"/l1"), mkdir(t, d+"/m")
			missing := d + "/no-such-layer"
			for _, o := range []Overlay{
				{Lowers: []string{l1, missing}},
				{Lowers: []string{missing}},
				{Lowers: []string{l1, missing}, Upper: mkdir(t, d+"/u"), Work: mkdir(t, d+"/w")},
			} {
				err := MountOverlay(o, target)
				if err == nil {
					cleanupUnmount(t, target)
					t.Fatal("MountOverlay with a missing lower succeeded")
				}
				if !strings.Contains(err.Error(), missing) {
					t.Errorf("error %q does not name the missing lower %s", err, missing)
				}
				if !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("error %q: want fs.ErrNotExist", err)
				}
			}
			// A file where a layer dir should be.
			writeFile(t, d+"/file", "x")
			err := MountOverlay(Overlay{Lowers: []string{l1, d + "/file"}}, target)
			if !errors.Is(err, ErrNotDir) || !strings.Contains(err.Error(), d+"/file") {
				t.Errorf("file as lower: %v, want ErrNotDir naming the path", err)
			}
			assertMountPoint(t, target, false)
		})
	}
}

// TestOverlayKernelMessages: when the kernel refuses, its own words (read
// from the fs context) are in the error. Most overlayfs mount errors go to
// the kernel log only; the lower-layer cap is one that comes back through
// the fs context, so the package's own check is bypassed here.
func TestOverlayKernelMessages(t *testing.T) {
	requireRoot(t)
	for _, api := range []overlayAPI{apiFd, apiString} {
		t.Run(api.String(), func(t *testing.T) {
			d := t.TempDir()
			lowers := make([]string, MaxLowers+1)
			for i := range lowers {
				lowers[i] = mkdir(t, fmt.Sprintf("%s/l%d", d, i))
			}
			target := mkdir(t, d+"/m")
			err := mountFsopen(&Overlay{Lowers: lowers}, target, true, api)
			if err == nil {
				cleanupUnmount(t, target)
				t.Fatal("501 lowers mounted")
			}
			if !strings.Contains(err.Error(), "kernel: e overlay: too many lower directories, limit is 500") {
				t.Errorf("error %q carries no kernel message", err)
			}
			if !strings.Contains(err.Error(), lowers[500]) {
				t.Errorf("error %q does not name the refused lower", err)
			}
			t.Logf("error: %v", err)
			assertMountPoint(t, target, false)
		})
	}
}

// TestOverlayErrorHintsAtKernelLog: overlayfs reports most mount-time
// errors (here: upper and work on different mounts) to the kernel log only;
// the error says where to look.
func TestOverlayErrorHintsAtKernelLog(t *testing.T) {
	requireRoot(t)
	d := t.TempDir()
	l1, l2, target := mkdir(t, d+"/l1"), mkdir(t, d+"/l2"), mkdir(t, d+"/m")
	tmp := mkdir(t, d+"/tmpfs")
	if err := unix.Mount("tmpfs", tmp, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, tmp)
	upper, work := mkdir(t, tmp+"/upper"), mkdir(t, d+"/work")
	err := MountOverlay(Overlay{Lowers: []string{l1, l2}, Upper: upper, Work: work}, target)
	if err == nil {
		cleanupUnmount(t, target)
		t.Fatal("upper and work on different mounts: mounted")
	}
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "kernel log") {
		t.Errorf("error %q: want EINVAL and a hint at the kernel log", err)
	}
	t.Logf("error: %v", err)
	assertMountPoint(t, target, false)
}

func TestOverlayInvalid(t *testing.T) {
	d := t.TempDir()
	target := mkdir(t, d+"/m")
	for name, o := range map[string]Overlay{
		"no lowers":       {},
		"empty lower":     {Lowers: []string{d, ""}},
		"upper sans work": {Lowers: []string{d}, Upper: d},
		"work sans upper": {Lowers: []string{d, d}, Work: d},
	} {
		if err := MountOverlay(o, target); err == nil {
			cleanupUnmount(t, target)
			t.Errorf("%s: mounted", name)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:                  `/a/b`,
		`/a\040b`:               `/a b`,
		`/a\011b\012c\134d`:     "/a\tb\nc\\d",
		`/trailing\04`:          `/trailing\04`,
		`/not\999octal`:         `/not\999octal`,
		filepath.Join("/", "x"): "/x",
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// A volatile overlay (an upper thrown away with the mount) says so in its
// super options, works like any other, and leaves the marker the kernel
// checks before it mounts the same upper again.
func TestOverlayVolatile(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		t.Run(api.String(), func(t *testing.T) {
			forceAPI(t, api)
			d := t.TempDir()
			low1, low2 := mkdir(t, d+"/l1"), mkdir(t, d+"/l2")
			upper, work, target := mkdir(t, d+"/upper"), mkdir(t, d+"/work"), mkdir(t, d+"/merged")
			writeFile(t, low2+"/a", "a")
			mountOverlayT(t, Overlay{Lowers: []string{low1, low2}, Upper: upper, Work: work, Volatile: true}, target)
			infos, err := MountsUnder(target)
			if err != nil || len(infos) == 0 {
				t.Fatalf("MountsUnder(%s) = %v, %v", target, infos, err)
			}
			// The kernel shows it as "volatile" or, since 6.6, "fsync=volatile".
			if opts := "," + strings.Join(infos[len(infos)-1].SuperOptions, ",") + ","; !strings.Contains(opts, ",volatile,") && !strings.Contains(opts, ",fsync=volatile,") {
				t.Errorf("super options %s lack volatile", opts)
			}
			writeFile(t, target+"/new", "n")
			assertContent(t, upper+"/new", "n")
			if _, err := os.Stat(work + "/work/incompat/volatile"); err != nil {
				t.Errorf("volatile marker missing: %v", err)
			}
		})
	}
}

// TestOverlayRefusesRepeatedLower records a kernel behaviour the driver
// works around: overlayfs refuses a directory given twice as a lower, with
// ELOOP from fsconfig(FSCONFIG_CMD_CREATE) or mount(2) and nothing but
// "overlayfs: conflicting lowerdir path" in the kernel log, on every API and
// with or without an upper. MountOverlay refuses it first, naming the
// directory. A stack that repeats a layer (two images with one base) is
// mounted with the layer once, at its topmost place; the second half checks
// that this shows what applying the layers one after another shows.
func TestOverlayRefusesRepeatedLower(t *testing.T) {
	requireRoot(t)
	for _, api := range allAPIs {
		for _, withUpper := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/upper=%v", api, withUpper), func(t *testing.T) {
				forceAPI(t, api)
				d := t.TempDir()
				base, mid := mkdir(t, d+"/base"), mkdir(t, d+"/mid")
				writeFile(t, base+"/x", "base-x")
				whiteout(t, mid+"/x")
				target := mkdir(t, d+"/merged")
				o := Overlay{Lowers: []string{base, mid, base}}
				if withUpper {
					o.Upper, o.Work = mkdir(t, d+"/upper"), mkdir(t, d+"/work")
				}
				// The kernel itself, past validate.
				var err error
				if api == apiClassic {
					err = mountClassic(&o, target, !withUpper)
				} else {
					err = mountFsopen(&o, target, !withUpper, api)
				}
				if err == nil {
					cleanupUnmount(t, target)
					t.Fatal("the kernel mounted a lower twice; the driver's dedup may be unneeded on this kernel")
				}
				if !errors.Is(err, unix.ELOOP) {
					t.Errorf("kernel error for a repeated lower = %v, want ELOOP", err)
				}
				err = MountOverlay(o, target)
				if !errors.Is(err, ErrRepeatedLower) || !strings.Contains(err.Error(), base) {
					t.Errorf("MountOverlay(repeated lower) = %v, want ErrRepeatedLower naming %s", err, base)
				}
				assertMountPoint(t, target, false)
			})
		}
	}
	t.Run("topmost occurrence shows the layers applied in order", func(t *testing.T) {
		d := t.TempDir()
		// Bottom first: base, mid, base. mid deletes x and makes d opaque;
		// base, applied again, brings x and d/p back next to mid's d/q.
		base, mid := mkdir(t, d+"/base"), mkdir(t, d+"/mid")
		writeFile(t, base+"/x", "base-x")
		writeFile(t, base+"/d/p", "base-p")
		whiteout(t, mid+"/x")
		writeFile(t, mid+"/d/q", "mid-q")
		opaque(t, mid+"/d")
		writeFile(t, mid+"/m", "mid-m")
		target := mkdir(t, d+"/merged")
		mountOverlayT(t, Overlay{Lowers: []string{base, mid}}, target) // top first
		assertContent(t, target+"/x", "base-x")
		assertContent(t, target+"/d/p", "base-p")
		assertContent(t, target+"/d/q", "mid-q")
		assertContent(t, target+"/m", "mid-m")
	})
}
