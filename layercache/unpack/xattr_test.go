package unpack

import (
	"archive/tar"
	"path/filepath"
	"testing"
)

// hostileXattrs are xattrs a layer may carry in PAX SCHILY.xattr records
// that must never reach the cache: overlayfs metadata (a forged redirect,
// metacopy or opaque marker makes overlayfs look where the layer does not
// say), security labels the node's LSM trusts (SELinux, SMACK, IMA/EVM),
// other trusted.* names that only root-level host software reads, and
// ACLs.
var hostileXattrs = []string{
	"trusted.overlay.redirect", "trusted.overlay.metacopy", "trusted.overlay.opaque", "trusted.overlay.origin",
	"user.overlay.redirect", "user.overlay.opaque",
	"security.selinux", "security.SMACK64", "security.ima", "security.evm", "security.apparmor",
	"trusted.t", "trusted.strata",
	"system.posix_acl_access",
}

// TestHostileXattrsDropped: of a layer's xattrs, only user.* and
// security.capability are kept (KeepXattr); the unpacker's own opaque marker
// for `.wh..wh..opq` is still set.
func TestHostileXattrsDropped(t *testing.T) {
	requireRoot(t)
	pax := func(h *tar.Header) {
		h.PAXRecords = map[string]string{
			"SCHILY.xattr.user.keep":            "kept",
			"SCHILY.xattr.security.capability":  "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
			"SCHILY.xattr.security.selinux":     "system_u:object_r:container_runtime_exec_t:s0",
			"SCHILY.xattr.security.ima":         "\x03\x02\x04",
			"SCHILY.xattr.trusted.t":            "tv",
			"SCHILY.xattr.trusted.overlay.meta": "y",
		}
		for _, k := range hostileXattrs {
			if _, ok := h.PAXRecords["SCHILY.xattr."+k]; !ok {
				h.PAXRecords["SCHILY.xattr."+k] = "/../../outside"
			}
		}
		// A value the kernel would refuse as an ACL: dropped before
		// it is tried, it does not fail the layer either.
		h.PAXRecords["SCHILY.xattr.system.posix_acl_access"] = "garbage"
	}
	layer, _ := mustApply(t,
		file("f", "x").with(pax),
		dir("d/").with(pax),
		fifo("p").with(pax),
		dir("o/"), file("o/.wh..wh..opq", ""),
	)
	for _, name := range []string{"f", "d", "p"} {
		wantNoXattr(name, append(hostileXattrs, "trusted.overlay.meta", "security.selinux", "security.ima")...)(t, layer)
		if name == "p" {
			// Linux allows user.* only on regular files and directories.
			continue
		}
		if got, err := getxattr(filepath.Join(layer, name), "user.keep"); err != nil || got != "kept" {
			t.Errorf("%s: want xattr user.keep=kept, got %q, %v", name, got, err)
		}
	}
	if got, err := getxattr(filepath.Join(layer, "f"), "security.capability"); err != nil || len(got) != 20 {
		t.Errorf("f: want security.capability kept, got %q, %v", got, err)
	}
	if got, err := getxattr(filepath.Join(layer, "o"), "trusted.overlay.opaque"); err != nil || got != "y" {
		t.Errorf("o: want the unpacker's own trusted.overlay.opaque=y for .wh..wh..opq, got %q, %v", got, err)
	}
}

// TestKeepXattr pins the one rule that the unpacker and commit share.
func TestKeepXattr(t *testing.T) {
	for _, k := range hostileXattrs {
		if KeepXattr(k) {
			t.Errorf("KeepXattr(%q) = true, want false", k)
		}
	}
	for _, k := range []string{"user.mime_type", "user.k", "security.capability"} {
		if !KeepXattr(k) {
			t.Errorf("KeepXattr(%q) = false, want true", k)
		}
	}
}
