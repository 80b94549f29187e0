package unpack

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireRoot fails the test when not run as root: every test here creates
// device nodes, chowns files, sets trusted.* xattrs or mounts overlayfs.
func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("root is required: these tests create device nodes, chown files, set trusted.* xattrs and mount overlayfs; run them with sudo")
	}
}

// ent is one tar entry of a test layer.
type ent struct {
	hdr  tar.Header
	body string
}

var testTime = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)

func file(name, body string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body)), ModTime: testTime}, body: body}
}

func dir(name string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: testTime}}
}

func symlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: testTime}}
}

func hardlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: testTime}}
}

func device(name string, typ byte, major, minor int64) ent {
	return ent{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o600, Devmajor: major, Devminor: minor, ModTime: testTime}}
}

func fifo(name string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: name, Mode: 0o640, ModTime: testTime}}
}

// with returns e after f changed its header.
func (e ent) with(f func(h *tar.Header)) ent {
	f(&e.hdr)
	return e
}

// makeTar writes entries as a PAX tar.
func makeTar(tb testing.TB, entries ...ent) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.Format == tar.FormatUnknown {
			h.Format = tar.FormatPAX
		}
		if err := tw.WriteHeader(&h); err != nil {
			tb.Fatalf("write tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			tb.Fatalf("write tar body %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatalf("close tar: %v", err)
	}
	return buf.Bytes()
}

// sandbox is <tmp>/root/layer (the target) next to <tmp>/root/outside, a
// sentinel tree that no layer may touch.
type sandbox struct {
	tmp, layer, outside string
}

func newSandbox(tb testing.TB, tmp string) sandbox {
	tb.Helper()
	s := sandbox{tmp: tmp, layer: filepath.Join(tmp, "root", "layer"), outside: filepath.Join(tmp, "root", "outside")}
	for _, d := range []string{s.layer, filepath.Join(s.outside, "dir")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	must(tb, os.WriteFile(filepath.Join(s.outside, "victim"), []byte("sentinel"), 0o644))
	must(tb, os.WriteFile(filepath.Join(s.outside, "dir", "victim2"), []byte("sentinel2"), 0o600))
	must(tb, os.WriteFile(filepath.Join(tmp, "root", "victim-next-to-layer"), []byte("sentinel3"), 0o600))
	must(tb, os.Symlink("victim", filepath.Join(s.outside, "link")))
	return s
}

func must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

// snapshot describes every path under root except the layer subtree: type,
// mode, owner, size, mtime, xattr-free content hash and symlink target.
func snapshot(tb testing.TB, root, layer string) map[string]string {
	tb.Helper()
	snap := make(map[string]string)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == layer {
			// The layer dir itself may get metadata from a "." entry.
			return filepath.SkipDir
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		desc := fmt.Sprintf("%v %v %d", fi.Mode(), fi.ModTime().UnixNano(), fi.Size())
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			desc += fmt.Sprintf(" %d:%d ino=%d nlink=%d", st.Uid, st.Gid, st.Ino, st.Nlink)
		}
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" %x", sha256.Sum256(b))
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + t
		}
		snap[p] = desc
		return nil
	})
	if err != nil {
		tb.Fatalf("snapshot %s: %v", root, err)
	}
	return snap
}

// diffSnapshots lists what changed between two snapshots.
func diffSnapshots(before, after map[string]string) []string {
	var diffs []string
	for p, b := range before {
		if a, ok := after[p]; !ok {
			diffs = append(diffs, "removed "+p)
		} else if a != b {
			diffs = append(diffs, fmt.Sprintf("changed %s: %s -> %s", p, b, a))
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			diffs = append(diffs, "created "+p)
		}
	}
	sort.Strings(diffs)
	return diffs
}

// listTree lists the layer as "path type" lines, for failure messages.
func listTree(root string) string {
	var lines []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		lines = append(lines, rel+" "+d.Type().String())
		return nil
	})
	return strings.Join(lines, "\n")
}

// applyTar applies entries into a fresh sandbox and returns it with the result.
func applyTar(tb testing.TB, entries ...ent) (sandbox, Stats, error) {
	tb.Helper()
	s := newSandbox(tb, tb.TempDir())
	st, err := Apply(context.Background(), s.layer, bytes.NewReader(makeTar(tb, entries...)))
	return s, st, err
}

// encodeScript turns entries into the textual form FuzzApply mutates: one
// entry per line, "type|name|linkname|mode|body" with the body quoted.
func encodeScript(entries []ent) []byte {
	var b strings.Builder
	for _, e := range entries {
		fmt.Fprintf(&b, "%c|%s|%s|%o|%s\n", e.hdr.Typeflag, e.hdr.Name, e.hdr.Linkname, e.hdr.Mode, strconv.Quote(e.body))
	}
	return []byte(b.String())
}

// decodeScript is the inverse of encodeScript, lenient with whatever the
// fuzzer produces. Besides tar's own type flags ('3' char devices are 0/0,
// whiteouts in overlayfs form; '4' block devices are 8/0):
//
//	x|NAME|KEY=VALUE|MODE|BODY   a regular file with the xattr KEY (PAX SCHILY.xattr.KEY)
//	y|NAME|KEY=VALUE|MODE|       a directory with the xattr KEY
//	z|NAME|SIZE|MODE|            a regular file of SIZE zero bytes (at most maxZeroFile
//	                             for all of them): a gzip bomb's payload, which
//	                             compresses to nothing
//	Z|NAME|SIZE|MODE|            a regular file that declares SIZE bytes (up to 1 TiB),
//	                             and the layer stream ends after its header
func decodeScript(data []byte) []ent {
	var entries []ent
	zeroBudget := int64(maxZeroFile) // for all 'z' entries together
	for _, line := range strings.Split(string(data), "\n") {
		if line == "" || len(entries) >= 64 {
			continue
		}
		f := strings.SplitN(line, "|", 5)
		for len(f) < 5 {
			f = append(f, "")
		}
		if f[0] == "" {
			continue
		}
		typ := f[0][0]
		mode, _ := strconv.ParseInt(f[3], 8, 64)
		body, err := strconv.Unquote(f[4])
		if err != nil {
			body = f[4]
		}
		e := ent{hdr: tar.Header{Typeflag: typ, Name: f[1], Linkname: f[2], Mode: mode & 0o7777, ModTime: testTime}}
		switch typ {
		case tar.TypeReg:
			if len(body) > 1<<16 {
				body = body[:1<<16]
			}
			e.body = body
			e.hdr.Size = int64(len(body))
		case tar.TypeBlock:
			e.hdr.Devmajor = 8
		case 'x', 'y': // a file or directory with xattrs: linkname is "key=value"
			e.hdr.Typeflag = tar.TypeReg
			if typ == 'y' {
				e.hdr.Typeflag = tar.TypeDir
			} else {
				if len(body) > 1<<16 {
					body = body[:1<<16]
				}
				e.body = body
				e.hdr.Size = int64(len(body))
			}
			if k, v, ok := strings.Cut(f[2], "="); ok {
				e.hdr.PAXRecords = map[string]string{"SCHILY.xattr." + k: v}
			}
			e.hdr.Linkname = ""
		case 'z', 'Z': // declared size in linkname; the body is made by tarFromScript
			size, _ := strconv.ParseInt(f[2], 10, 64)
			limit := zeroBudget
			if typ == 'Z' {
				limit = 1 << 40
			}
			e.hdr.Typeflag, e.hdr.Linkname, e.hdr.Size = tar.TypeReg, "", min(max(size, 0), limit)
			if typ == 'z' {
				zeroBudget -= e.hdr.Size
			}
			if typ == 'Z' {
				e.body = truncatedMarker
			}
		}
		entries = append(entries, e)
	}
	return entries
}

// maxZeroFile bounds the 'z' entries of a fuzz script together: big enough
// to show that zeros become holes, small enough for many executions a
// second.
const maxZeroFile = 16 << 20

// truncatedMarker is the body of a 'Z' entry: the stream ends after it.
const truncatedMarker = "\x00truncated"

// tarFromScript builds a tar stream from a fuzz script, dropping entries that
// archive/tar cannot write (it refuses, for example, NUL bytes in names).
// Zero-filled bodies are generated as the stream is read, not held in
// memory.
func tarFromScript(data []byte) io.Reader {
	var parts []io.Reader
	for _, e := range decodeScript(data) {
		h := e.hdr
		h.Format = tar.FormatPAX
		// A tar.Writer per entry: an entry's header and body, padded to
		// the 512-byte block, are exactly what it writes before Close.
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		if err := tw.WriteHeader(&h); err != nil {
			// An invalid header is not written.
			continue
		}
		switch {
		case e.body == truncatedMarker:
			// The stream ends here, h.Size bytes short.
			return io.MultiReader(append(parts, &buf)...)
		case h.Typeflag == tar.TypeReg && h.Size > int64(len(e.body)):
			pad := (512 - h.Size%512) % 512
			parts = append(parts, bytes.NewReader(buf.Bytes()), io.LimitReader(zeros{}, h.Size+pad))
			continue
		}
		tw.Write([]byte(e.body))
		tw.Flush()
		parts = append(parts, bytes.NewReader(buf.Bytes()))
	}
	// The end-of-archive marker: two zero blocks.
	parts = append(parts, bytes.NewReader(make([]byte, 1024)))
	return io.MultiReader(parts...)
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
