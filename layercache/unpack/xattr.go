package unpack

import "strings"

// KeepXattr is the one rule for which xattrs a layer carries, shared by the
// unpacker (a layer's PAX SCHILY.xattr records) and by package commit (an
// upper directory's xattrs): user.* data and security.capability (file
// capabilities are part of a binary, as docker keeps them) are kept;
// everything else is dropped, because a layer is untrusted and these names
// are read by the kernel or the host with authority:
//
//   - trusted.overlay.* and user.overlay.*: overlayfs metadata. A layer that
//     set redirect, metacopy or opaque itself could make overlayfs look
//     somewhere the layer does not say. The unpacker sets
//     trusted.overlay.opaque itself for a `.wh..wh..opq` entry.
//   - security.* other than capability: SELinux, SMACK, AppArmor and IMA/EVM
//     labels, which the node's security modules trust.
//   - other trusted.*: names only privileged host software reads.
//   - system.* (POSIX ACLs): they are not kept either, so that one short list
//     says what a layer can set.
//
// Linux refuses user.* on symlinks: the unpacker drops those too.
func KeepXattr(key string) bool {
	switch {
	case key == "security.capability":
		return true
	case strings.HasPrefix(key, "user.overlay."):
		return false
	case strings.HasPrefix(key, "user."):
		return true
	}
	return false
}
