package commit

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache/unpack"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests create overlayfs whiteouts (device nodes, trusted.* xattrs): run them as root")
	}
}

// tarEntry is what a test checks of one entry.
type tarEntry struct {
	typ    byte
	mode   int64
	link   string
	body   string
	xattrs map[string]string
}

func readTar(t *testing.T, data []byte) (map[string]tarEntry, []string) {
	t.Helper()
	out := map[string]tarEntry{}
	var order []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out, order
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		x := map[string]string{}
		for k, v := range h.PAXRecords {
			if k, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				x[k] = v
			}
		}
		out[h.Name] = tarEntry{typ: h.Typeflag, mode: h.Mode, link: h.Linkname, body: string(body), xattrs: x}
		order = append(order, h.Name)
	}
}

// TestWriteTarMapping: each thing overlayfs leaves in an upper becomes its
// OCI layer form, and the layer unpacks back into the same upper.
func TestWriteTarMapping(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	p := func(n string) string { return filepath.Join(upper, n) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(p("d/opq"), 0o755))
	must(unix.Setxattr(p("d/opq"), "trusted.overlay.opaque", []byte("y"), 0))
	must(unix.Setxattr(p("d"), "trusted.overlay.impure", []byte("y"), 0))
	must(os.WriteFile(p("d/opq/kept"), []byte("kept"), 0o644))
	must(os.WriteFile(p("d/f"), []byte("content"), 0o644))
	must(unix.Setxattr(p("d/f"), "user.k", []byte("v"), 0))
	must(unix.Setxattr(p("d/f"), "trusted.overlay.origin", []byte("x"), 0))
	must(unix.Setxattr(p("d/f"), "security.capability", []byte("\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), 0))
	// After the capability, which clears setuid.
	must(os.Chmod(p("d/f"), 0o755|os.ModeSetuid))
	must(os.Link(p("d/f"), p("d/g")))
	must(os.Symlink("f", p("d/s")))
	// Overlayfs shares one whiteout inode between deletions (Linux 5.8+):
	// linked whiteouts must stay whiteouts, not become a hardlink entry.
	must(unix.Mknod(p("gone"), unix.S_IFCHR, 0))
	must(os.Link(p("gone"), p("d/gone2")))

	var buf bytes.Buffer
	st, err := WriteTar(context.Background(), upper, &buf)
	if err != nil {
		t.Fatal(err)
	}
	got, order := readTar(t, buf.Bytes())
	want := map[string]tarEntry{
		"d/":                 {typ: tar.TypeDir, mode: 0o755, xattrs: map[string]string{}},
		"d/f":                {typ: tar.TypeReg, mode: 0o4755, body: "content", xattrs: map[string]string{"user.k": "v", "security.capability": "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		"d/g":                {typ: tar.TypeLink, mode: 0o4755, link: "d/f", xattrs: map[string]string{}},
		"d/s":                {typ: tar.TypeSymlink, mode: 0o777, link: "f", xattrs: map[string]string{}},
		"d/.wh.gone2":        {typ: tar.TypeReg, xattrs: map[string]string{}},
		"d/opq/":             {typ: tar.TypeDir, mode: 0o755, xattrs: map[string]string{}},
		"d/opq/.wh..wh..opq": {typ: tar.TypeReg, xattrs: map[string]string{}},
		"d/opq/kept":         {typ: tar.TypeReg, mode: 0o644, body: "kept", xattrs: map[string]string{}},
		".wh.gone":           {typ: tar.TypeReg, xattrs: map[string]string{}},
	}
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("no entry %q; have %v", name, order)
			continue
		}
		if g.typ != w.typ || g.mode != w.mode || g.link != w.link || g.body != w.body || len(g.xattrs) != len(w.xattrs) {
			t.Errorf("entry %q = %+v, want %+v", name, g, w)
		}
		for k, v := range w.xattrs {
			if g.xattrs[k] != v {
				t.Errorf("entry %q xattr %s = %q, want %q", name, k, g.xattrs[k], v)
			}
		}
	}
	if len(got) != len(want) {
		t.Errorf("entries %v, want %d", order, len(want))
	}
	if st.Whiteouts != 2 || st.Opaques != 1 || st.Hardlinks != 1 || st.Files != 2 {
		t.Errorf("stats = %+v", st)
	}

	// The layer unpacks into the overlayfs form it came from.
	out := t.TempDir()
	if _, err := unpack.Apply(context.Background(), out, bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if _, err := WriteTar(context.Background(), out, &again); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(stripTimes(t, buf.Bytes()), stripTimes(t, again.Bytes())) {
		t.Errorf("upper -> layer -> unpack -> layer is not the same layer")
	}
}

// stripTimes rewrites a tar without directory mtimes (unpacking sets them,
// but the old mtime of a whiteout-sharing parent may differ) for comparison.
func stripTimes(t *testing.T, data []byte) []byte {
	t.Helper()
	got, order := readTar(t, data)
	var b strings.Builder
	for _, n := range order {
		e := got[n]
		b.WriteString(n + "|" + string(e.typ) + "|" + e.link + "|" + e.body + "\n")
	}
	return []byte(b.String())
}

// TestWriteTarRefuses: what a layer cannot say is refused with its sentinel.
func TestWriteTarRefuses(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name  string
		setup func(upper string) error
		want  error
	}{
		{"redirect", func(u string) error {
			if err := os.Mkdir(filepath.Join(u, "moved"), 0o755); err != nil {
				return err
			}
			return unix.Setxattr(filepath.Join(u, "moved"), "trusted.overlay.redirect", []byte("/orig"), 0)
		}, ErrOverlayFeature},
		{"metacopy", func(u string) error {
			if err := os.WriteFile(filepath.Join(u, "f"), nil, 0o644); err != nil {
				return err
			}
			return unix.Setxattr(filepath.Join(u, "f"), "trusted.overlay.metacopy", nil, 0)
		}, ErrOverlayFeature},
		{"whiteout-like name", func(u string) error {
			return os.WriteFile(filepath.Join(u, ".wh.data"), []byte("x"), 0o644)
		}, ErrUnrepresentable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			upper := t.TempDir()
			if err := tc.setup(upper); err != nil {
				t.Fatal(err)
			}
			_, err := WriteTar(context.Background(), upper, io.Discard)
			if !errors.Is(err, tc.want) {
				t.Fatalf("WriteTar: got %v, want %v", err, tc.want)
			}
		})
	}
}

// TestBuildDigests: the digests Build computes while writing are those of
// the file it wrote.
func TestBuildDigests(t *testing.T) {
	upper := t.TempDir()
	if err := os.WriteFile(filepath.Join(upper, "f"), bytes.Repeat([]byte("x"), 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := Build(context.Background(), upper, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	check := func(what string, open func() (io.ReadCloser, error), want func() (v1Hash, error)) {
		rc, err := open()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		h, n, err := sha256Of(rc)
		if err != nil {
			t.Fatal(err)
		}
		w, _ := want()
		if h != w.String() {
			t.Errorf("%s: content hashes to %s, Build said %s (%d bytes)", what, h, w, n)
		}
	}
	check("blob", l.Compressed, l.Digest)
	check("tar", l.Uncompressed, l.DiffID)
	if size, _ := l.Size(); size <= 0 || size > 100<<10 {
		t.Errorf("size %d for 1 MiB of x", size)
	}
}
