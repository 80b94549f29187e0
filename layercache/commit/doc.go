// Package commit turns the writable upper directory of an overlay mount into
// one OCI image layer, and pushes a base image with that layer appended.
//
// It reads the upper directory, never the merged view: committing 100 MB of
// changes over a 10 GB base reads 100 MB. An upper directory is already a
// diff, in overlayfs's own notation; WriteTar translates it into the OCI one,
// the inverse of package unpack:
//
//	upper                                      layer tar
//	regular file, dir, symlink, FIFO           the same, with mode (setuid,
//	                                           setgid, sticky too), uid/gid,
//	                                           mtime (ns, PAX)
//	two names of one inode                     a file and a hardlink entry
//	character device 0/0 NAME                  .wh.NAME (a deletion)
//	dir with trusted.overlay.opaque=y          the dir, then DIR/.wh..wh..opq
//	xattrs user.* (but overlay's),             SCHILY.xattr.* PAX records
//	security.capability                        (unpack.KeepXattr, the pull's rule)
//	trusted.overlay.* other than opaque        dropped: overlayfs bookkeeping
//	                                           (origin, impure, nlink, ...)
//	security.* other than capability           dropped: host labels (SELinux,
//	                                           IMA) that mean nothing elsewhere
//	other trusted.*, system.posix_acl_*        dropped: a pull would drop them
//	other device nodes, sockets                skipped and counted, as the
//	                                           unpacker skips device nodes
//
// The upper root itself is not an entry: its metadata is the plugin's
// (0755 root:root), not the image's.
//
// Overlayfs can also leave markers that only make sense together with the
// lower layers: trusted.overlay.redirect (a directory renamed with
// redirect_dir=on) and trusted.overlay.metacopy (a file whose data is still
// in a lower layer, metacopy=on). Strata mounts with both off (and index off,
// see driver/mount), so its uppers hold neither: a renamed lower directory
// is copied whole by the renaming tool (rename(2) fails with EXDEV) and the
// old name gets a whiteout. An upper that does hold one, from a mount made
// with other options, is refused with ErrOverlayFeature rather than turned
// into a layer that silently lacks data.
//
// Changes reads an upper directory the same way to list, against the lower
// layers, the paths it adds, changes and deletes, as docker diff does (the
// strata diff command).
package commit
