package mount

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Options are the per-mount options that a volume may ask for: a
// StorageClass's or a PersistentVolume's mountOptions, which kubelet hands
// to the plugin as the capability's mount flags. They change how the mount
// at the pod's path behaves (executing, access times), never what the
// volume shows nor where its layers are: overlayfs's own options (lowerdir,
// upperdir, workdir, redirect_dir, ...) are the plugin's alone, and suid
// and dev are refused, since an image's setuid files and device nodes must
// not become a way out of a pod. The zero value is the default mount
// (nosuid, nodev, exec, the kernel's relatime).
type Options struct {
	// NoExec: no file on the volume can be executed (noexec).
	NoExec bool
	// Atime is how access times are kept: "noatime", "relatime" or
	// "strictatime"; "" leaves the kernel's default (relatime).
	Atime string
	// NoDirAtime: directories' access times are never updated.
	NoDirAtime bool
}

// OptionNames are the mount options ParseOptions accepts.
var OptionNames = []string{"ro", "rw", "exec", "noexec", "noatime", "relatime", "strictatime", "nodiratime", "diratime", "nosuid", "nodev", "defaults"}

// ParseOptions parses mount options, each a name or a comma-separated list
// of names (as mountOptions: ["noatime,noexec"] is often written). "ro"
// is returned as readOnly: it makes the publish read-only, with no
// writable upper. An unknown option is an error that names it and lists
// the ones that apply; a later option overrides an earlier contrary one, as
// mount(8) does.
func ParseOptions(flags []string) (o Options, readOnly bool, err error) {
	for _, f := range flags {
		for _, name := range strings.Split(f, ",") {
			switch name = strings.TrimSpace(name); name {
			case "", "defaults", "nosuid", "nodev":
				// Always so.
			case "ro":
				readOnly = true
			case "rw":
				readOnly = false
			case "exec":
				o.NoExec = false
			case "noexec":
				o.NoExec = true
			case "noatime", "relatime", "strictatime":
				o.Atime = name
			case "nodiratime":
				o.NoDirAtime = true
			case "diratime":
				o.NoDirAtime = false
			case "suid", "dev":
				return Options{}, false, fmt.Errorf("mount option %q is refused: volumes are always mounted nosuid,nodev, so that an image's setuid files and device nodes are no way out of a pod", name)
			default:
				return Options{}, false, fmt.Errorf("mount option %q is not supported: the options that apply to a volume are %s", name, strings.Join(OptionNames, ", "))
			}
		}
	}
	return o, readOnly, nil
}

// List returns the options as mount(8) names, in a fixed order; nil for
// the defaults.
func (o Options) List() []string {
	var out []string
	if o.NoExec {
		out = append(out, "noexec")
	}
	if o.Atime != "" {
		out = append(out, o.Atime)
	}
	if o.NoDirAtime {
		out = append(out, "nodiratime")
	}
	return out
}

// attr returns the mount attributes (mount_setattr, fsmount) of a mount with
// o, nosuid and nodev always, read-only if readOnly; clr is what must be
// cleared first for them to apply (the access-time mode is one field).
func (o Options) attr(readOnly bool) (set, clr uint64) {
	set = unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	if readOnly {
		set |= unix.MOUNT_ATTR_RDONLY
	}
	if o.NoExec {
		set |= unix.MOUNT_ATTR_NOEXEC
	}
	if o.NoDirAtime {
		set |= unix.MOUNT_ATTR_NODIRATIME
	}
	if o.Atime != "" {
		clr = unix.MOUNT_ATTR__ATIME
		switch o.Atime {
		case "noatime":
			set |= unix.MOUNT_ATTR_NOATIME
		case "strictatime":
			set |= unix.MOUNT_ATTR_STRICTATIME
		case "relatime":
			set |= unix.MOUNT_ATTR_RELATIME
		}
	}
	return set, clr
}

// flags returns the mount(2) flags of a mount with o, nosuid and nodev
// always, read-only if readOnly.
func (o Options) flags(readOnly bool) uintptr {
	f := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
	if readOnly {
		f |= unix.MS_RDONLY
	}
	if o.NoExec {
		f |= unix.MS_NOEXEC
	}
	if o.NoDirAtime {
		f |= unix.MS_NODIRATIME
	}
	switch o.Atime {
	case "noatime":
		f |= unix.MS_NOATIME
	case "strictatime":
		f |= unix.MS_STRICTATIME
	case "relatime":
		f |= unix.MS_RELATIME
	}
	return f
}
