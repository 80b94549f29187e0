package unpack

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

var updateCorpus = flag.Bool("update-fuzz-corpus", false, "write FuzzApply's seeds to testdata/fuzz/FuzzApply")

// fuzzSeeds are FuzzApply's named seeds: every breakout case that needs no
// absolute path, and hostile layers in the script's own notation (see
// decodeScript). They are also kept as files in testdata/fuzz/FuzzApply
// (TestFuzzCorpus), next to what `go test -fuzz` finds.
func fuzzSeeds() map[string][]byte {
	seeds := map[string][]byte{}
	clean := regexp.MustCompile(`[^a-z0-9]+`)
	for _, tc := range breakouts() {
		if tc.abs == nil {
			seeds["breakout-"+strings.Trim(clean.ReplaceAllString(tc.name, "-"), "-")] = encodeScript(tc.entries)
		}
	}
	seeds["mix"] = encodeScript([]ent{
		dir("a/"), file("a/f", "hello"), symlink("a/l", "f"), hardlink("a/h", "a/f"),
		file("a/.wh.x", ""), file("a/.wh..wh..opq", ""), fifo("a/p"), file("b/c/d", "implied"),
	})
	seeds["symlink-swap"] = encodeScript([]ent{
		dir("d/"), file("d/x", "x"), symlink("d", "../outside"), file("d/victim", "pwned"),
		symlink("e", "d"), hardlink("e/h", "d/x"), file("/..//../outside/dir/victim2", "x"),
	})
	long := strings.Repeat("a", 255)
	for name, script := range map[string]string{
		// Xattrs a layer must not set (KeepXattr), on files and directories.
		"xattr-overlay": "x|f|user.k=v|644|\"data\"\nx|g|trusted.overlay.redirect=/..|644|\"\"\n" +
			"y|d|trusted.overlay.opaque=y|755|\ny|e|trusted.overlay.redirect=/../outside|755|\n" +
			"x|m|trusted.overlay.metacopy=|644|\"\"\ny|u|user.overlay.opaque=y|755|\n",
		"xattr-security": "x|f|security.selinux=system_u:object_r:container_runtime_exec_t:s0|755|\"#!\"\n" +
			"x|g|security.ima=\\x03\\x02|644|\"\"\ny|d|security.SMACK64=_|755|\nx|t|trusted.strata=1|644|\"\"\n" +
			"x|a|system.posix_acl_access=garbage|644|\"\"\nx|h|security.capability=not-a-capability|755|\"\"\n",
		// Whiteout tricks.
		"whiteout-names": "0|.wh..wh..opq||644|\"\"\n0|.wh..wh.plnk/1||644|\"x\"\n0|a/.wh...|||\"\"\n" +
			"0|a/.wh.b/c||644|\"\"\n0|.wh..||644|\"\"\n0|.wh.../x||644|\"\"\n0|.wh.|||\"\"\n",
		"whiteout-then-recreate":      "5|d||755|\n0|d/f||644|\"x\"\n0|.wh.d||644|\"\"\n5|d||755|\n0|d/.wh..wh..opq||644|\"\"\n3|d/g||0|\n1|h|d/g|644|\n",
		"opaque-through-symlink":      "2|d|../outside|777|\n0|d/.wh..wh..opq||644|\"\"\n",
		"whiteout-through-symlink":    "2|d|/|777|\n0|d/.wh.etc||644|\"\"\n2|e|../outside|777|\n0|e/.wh.victim||644|\"\"\n",
		"whiteout-of-hardlink-target": "0|f||644|\"x\"\n1|g|f|644|\n0|.wh.f||644|\"\"\n1|h|f|644|\n",
		// Huge and unsafe names.
		"long-component":   "0|" + long + "||644|\"x\"\n0|" + long + "b||644|\"x\"\n",
		"long-path":        "0|" + strings.Repeat("d/", 2100) + "f||644|\"x\"\n",
		"long-link-target": "2|l|" + strings.Repeat("../", 1400) + "|777|\n1|h|" + strings.Repeat("a/../", 900) + "l|644|\n",
		"control-names":    "0|a\\x01b||644|\"x\"\n0|\\t||644|\"\"\n0| ||644|\"\"\n0|../||644|\"\"\n5|./../||755|\n",
		// Hardlink and symlink escapes.
		"hardlink-escapes":        "1|h|../outside/victim|644|\n1|i|/../outside/victim|644|\n2|s|../outside|777|\n1|j|s/victim|644|\n1|k|s|644|\n0|k/x||644|\"x\"\n",
		"symlink-chain":           "2|a|b|777|\n2|b|c|777|\n2|c|../outside|777|\n0|a/victim||644|\"pwned\"\n2|loop|loop|777|\n0|loop/x||644|\"\"\n",
		"dir-replaced-by-symlink": "5|d||755|\n0|d/f||644|\"x\"\n2|d|/etc|777|\n0|d/passwd||644|\"x\"\n",
		// A gzip bomb's payload: large files of zeros (16 MiB in all, the
		// script's limit), which must become holes and take no disk; a file
		// that declares a terabyte and whose stream ends.
		"zeros-16MiB":       "z|big|16773120|644|\nz|big2|4097|644|\n0|after||644|\"x\"\n",
		"declared-terabyte": "0|before||644|\"x\"\nZ|huge|1099511627776|644|\n",
		"devices":           "3|w||0|\n4|sda||600|\n6|p||600|\n1|h|sda|644|\n1|i|p|644|\n",
	} {
		seeds[name] = []byte(script)
	}
	return seeds
}

// FuzzApply feeds Apply layers built from a small text script (see
// decodeScript); raw tar bytes would mostly die on header checksums before
// reaching Apply. Whatever the layer, Apply must not panic, must not create or
// change anything outside its target, and on success must leave no ".wh."
// name, no xattr that KeepXattr refuses (but its own opaque marker), no
// device node but whiteouts, and no more disk in use than the layer's
// non-zero content.
//
//	go test -run '^$' -fuzz FuzzApply -fuzztime 5m ./layercache/unpack
func FuzzApply(f *testing.F) {
	requireRoot(f)
	names := make([]string, 0, len(fuzzSeeds()))
	seeds := fuzzSeeds()
	for name := range seeds {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		f.Add(seeds[name])
	}

	f.Fuzz(func(t *testing.T, script []byte) {
		tmp := t.TempDir()
		s := sandbox{tmp: tmp, layer: filepath.Join(tmp, "a", "layer"), outside: filepath.Join(tmp, "a", "outside")}
		must(t, os.MkdirAll(s.layer, 0o755))
		must(t, os.MkdirAll(filepath.Join(s.outside, "dir"), 0o755))
		must(t, os.WriteFile(filepath.Join(s.outside, "victim"), []byte("sentinel"), 0o644))
		must(t, os.WriteFile(filepath.Join(s.outside, "dir", "victim2"), []byte("sentinel2"), 0o644))
		must(t, os.Symlink("victim", filepath.Join(s.outside, "link")))
		before := snapshot(t, tmp, s.layer)
		beforeOutside := snapshot(t, s.outside, s.layer)

		_, err := Apply(context.Background(), s.layer, tarFromScript(script))

		if diffs := diffSnapshots(before, snapshot(t, tmp, s.layer)); len(diffs) > 0 {
			t.Fatalf("Apply (err: %v) changed things outside the layer:\n%v", err, diffs)
		}
		var ue *UnsafeError
		if errors.Is(err, ErrUnsafe) != errors.As(err, &ue) {
			t.Fatalf("error %v: errors.Is(ErrUnsafe) and errors.As(*UnsafeError) disagree", err)
		}
		if err == nil {
			assertNoWhiteoutNames(t, s.layer)
			assertLayerInvariants(t, s.layer, script)
		}
		// As the caller does on error (and the test's cleanup would anyway):
		// removing the layer must not reach outside either.
		must(t, os.RemoveAll(s.layer))
		if diffs := diffSnapshots(beforeOutside, snapshot(t, s.outside, s.layer)); len(diffs) > 0 {
			t.Fatalf("removing the layer changed things outside it:\n%v", diffs)
		}
	})
}

// assertLayerInvariants checks what a successfully unpacked layer may hold:
// only the xattrs KeepXattr allows (and trusted.overlay.opaque=y, the
// unpacker's own), no device node but 0/0 whiteouts, and no more allocated
// disk than the script's non-zero bytes plus a block per file (zeros become
// holes).
func assertLayerInvariants(t *testing.T, layer string, script []byte) {
	t.Helper()
	var allocated, files int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(layer, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFCHR, syscall.S_IFBLK:
			if st.Mode&syscall.S_IFMT == syscall.S_IFBLK || st.Rdev != 0 {
				t.Errorf("%s: device node %#o rdev %d in the layer: only 0/0 whiteouts may be", p, st.Mode, st.Rdev)
			}
		case syscall.S_IFREG:
			if !seen[st.Ino] {
				seen[st.Ino] = true
				allocated += st.Blocks * 512
				files++
			}
		}
		for _, k := range listXattrs(t, p) {
			if KeepXattr(k) {
				continue
			}
			if v, _ := getxattr(p, k); k == "trusted.overlay.opaque" && v == "y" && d.IsDir() {
				continue
			}
			t.Errorf("%s: xattr %s in the layer, which KeepXattr refuses", p, k)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk the layer: %v", err)
	}
	if limit := int64(len(script)) + 8192*(files+1); allocated > limit {
		t.Errorf("the layer allocates %d bytes of disk for %d files from a %d-byte script (want at most %d): zeros were written, not left as holes",
			allocated, files, len(script), limit)
	}
}

// listXattrs lists the xattr names of p, not following a symlink.
func listXattrs(t *testing.T, p string) []string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var keys []string
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k != "" {
			keys = append(keys, k)
		}
	}
	return keys
}

// corpusFile is a seed in the format of Go's fuzzing corpus.
func corpusFile(script []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(script)))
}

// TestFuzzCorpus: the seeds are kept in testdata/fuzz/FuzzApply (go test
// runs every file there, and `go test -fuzz` adds what it finds). Run with
// -update-fuzz-corpus after changing fuzzSeeds.
func TestFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzApply")
	for name, script := range fuzzSeeds() {
		p := filepath.Join(dir, "seed-"+name)
		want := corpusFile(script)
		if *updateCorpus {
			must(t, os.MkdirAll(dir, 0o755))
			must(t, os.WriteFile(p, want, 0o644))
			continue
		}
		got, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s is missing or out of date (%v): run go test -run TestFuzzCorpus -update-fuzz-corpus ./layercache/unpack", p, err)
		}
	}
}
