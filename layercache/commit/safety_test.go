package commit

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache/unpack"
)

// TestWriteTarXattrRule: a commit keeps exactly the xattrs a pull keeps
// (unpack.KeepXattr): user.* and security.capability, not other trusted.*
// names nor security labels, which the unpacker would drop anyway.
func TestWriteTarXattrRule(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	f := filepath.Join(upper, "f")
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	set := map[string]string{
		"user.k":              "v",
		"security.capability": "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
		"trusted.strata":      "t",
		"security.selinux":    "system_u:object_r:etc_t:s0",
	}
	for k, v := range set {
		if err := unix.Setxattr(f, k, []byte(v), 0); err != nil {
			t.Fatalf("setxattr %s: %v", k, err)
		}
	}
	var buf bytes.Buffer
	if _, err := WriteTar(context.Background(), upper, &buf); err != nil {
		t.Fatal(err)
	}
	got, _ := readTar(t, buf.Bytes())
	x := got["f"].xattrs
	for k, v := range set {
		_, has := x[k]
		if keep := unpack.KeepXattr(k); has != keep {
			t.Errorf("committed layer has xattr %s: %v; the unpacker keeps it: %v", k, has, keep)
		} else if has && x[k] != v {
			t.Errorf("xattr %s = %q, want %q", k, x[k], v)
		}
	}
	if len(x) != 2 {
		t.Errorf("committed xattrs %v, want user.k and security.capability only", x)
	}
}
