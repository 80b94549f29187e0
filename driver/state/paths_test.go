package state

import (
	"testing"
)

func TestKeySeparatesTargets(t *testing.T) {
	a, b := Key("pv-1", "/var/lib/kubelet/pods/a/volumes/x"), Key("pv-1", "/var/lib/kubelet/pods/b/volumes/x")
	if a == b || !IsKey(a) || Key("pv-1", "/var/lib/kubelet/pods/a/volumes/x/") != a {
		t.Errorf("keys %s, %s: want distinct volume keys, stable under a trailing slash", a, b)
	}
	if IsKey("clone/pv-1") || IsKey("prepull:r/x") || IsKey(a[:31]) {
		t.Error("IsKey accepts what is no key")
	}
}

// TestOwners: every owner the driver makes parses back to its kind and
// name, and an owner it did not make is unknown (recovery leaves it).
func TestOwners(t *testing.T) {
	key := Key("pv-1", "/t")
	for _, tc := range []struct {
		owner string
		kind  OwnerKind
		name  string
	}{
		{PublishOwner(key), OwnerPublish, key},
		{CloneOwner("strata-0a1b"), OwnerClone, "strata-0a1b"},
		{PrepullOwner("registry.example.com/ds:v1"), OwnerPrepull, "registry.example.com/ds:v1"},
		{"clone/../x", OwnerUnknown, "clone/../x"},
		{"prepull:", OwnerUnknown, "prepull:"},
		{"someone-else", OwnerUnknown, "someone-else"},
	} {
		if kind, name := ParseOwner(tc.owner); kind != tc.kind || name != tc.name {
			t.Errorf("ParseOwner(%q) = %v %q, want %v %q", tc.owner, kind, name, tc.kind, tc.name)
		}
	}
}

// TestPathsStayInTheirDirectory: every path of a publish and of a clone is
// in its own directory.
func TestPathsStayInTheirDirectory(t *testing.T) {
	p := Publish("/root", "k")
	for _, f := range []string{p.Record, p.Upper, p.Work, p.Image, p.FS, p.CappedUpper, p.CappedWork, p.Mnt} {
		if len(f) <= len(p.Dir)+1 || f[:len(p.Dir)+1] != p.Dir+"/" {
			t.Errorf("publish path %s is outside %s", f, p.Dir)
		}
	}
	c := ClonePathsOf("/root", "strata-1")
	for _, f := range []string{c.Record, c.Stage, c.Image, c.FS, c.Upper, c.Work} {
		if len(f) <= len(c.Dir)+1 || f[:len(c.Dir)+1] != c.Dir+"/" {
			t.Errorf("clone path %s is outside %s", f, c.Dir)
		}
	}
}
