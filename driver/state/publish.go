package state

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
)

// Record is volumes/<key>/volume.json: everything needed to recognise a
// repeated publish and to undo a publish after a restart, and the pod it was
// published for.
type Record struct {
	VolumeID   string `json:"volumeID"`
	TargetPath string `json:"targetPath"`
	// Image and Digest are the bottom image of the stack (the image
	// attribute), kept on their own so that readers older than stacks
	// still find the volume's image.
	Image      string  `json:"image"`
	PullPolicy string  `json:"pullPolicy"`
	SubPath    string  `json:"subPath,omitempty"`
	ReadOnly   bool    `json:"readOnly"`
	Digest     v1.Hash `json:"digest"`
	// Stack is every image of the volume, bottom first, Image included;
	// records written before stacks existed lack it (see Images).
	Stack []StackImage `json:"stack,omitempty"`
	// Layers are the layers mounted, bottom first: the stack's layers with
	// each kept once, at its topmost place.
	Layers    []v1.Hash `json:"layers"`
	Published time.Time `json:"published"`
	// The pod the volume was published for, when kubelet says
	// (podInfoOnMount); records written before these existed lack them.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	PodUID       string `json:"podUID,omitempty"`
	// Clone marks the publish of a persistent clone: a bind of the clone's
	// overlay, staged at StagingPath, to the target. Such a publish has no
	// upper of its own (the clone's is CloneUpper(root, VolumeID)), holds
	// no layer references (the clone does, as CloneOwner), and undoing it
	// only unmounts the bind.
	Clone       bool   `json:"clone,omitempty"`
	StagingPath string `json:"stagingPath,omitempty"`
	// Size is the size attribute of the publish in bytes, 0 when it gave
	// none. UpperBytes is the cap of its writable upper: the size, else
	// the plugin's default, in a filesystem of its own (disk.img mounted
	// at UpperFSDir); 0 when the upper is a directory on the state root's
	// filesystem (no default cap, or written before caps existed) and
	// when there is no upper (read-only, clone).
	Size       int64 `json:"size,omitempty"`
	UpperBytes int64 `json:"upperBytes,omitempty"`
	// SingleWriter: published with access mode SINGLE_NODE_SINGLE_WRITER
	// (ReadWriteOncePod); no other target may have the volume meanwhile.
	SingleWriter bool `json:"singleWriter,omitempty"`
	// MountOptions are the publish's mount options (noexec, access
	// times), as mount(8) names them; nil for the defaults.
	MountOptions []string `json:"mountOptions,omitempty"`
}

// StackImage is one image of a volume's stack.
type StackImage struct {
	Image  string  `json:"image"`
	Digest v1.Hash `json:"digest"`
}

// Images returns the volume's stack, bottom first. A record without a
// stack (one image, or written before stacks existed) is the stack of its
// Image alone.
func (r *Record) Images() []StackImage {
	if len(r.Stack) > 0 {
		return r.Stack
	}
	if r.Image == "" {
		return nil
	}
	return []StackImage{{Image: r.Image, Digest: r.Digest}}
}

// Refs returns the references of the volume's stack, bottom first.
func (r *Record) Refs() []string {
	var out []string
	for _, im := range r.Images() {
		out = append(out, im.Image)
	}
	return out
}

// SameRequest reports whether a publish asks for what r already is: the
// same stack of references, in the same order. Digests are not compared: a
// tag that moved applies to new publishes only. Nor is the pod: kubelet's
// target path already names it. The size attribute is, but not the cap it
// came to: a publish without size after a change of the plugin's default
// keeps the cap it was made with.
func (r *Record) SameRequest(o *Record) bool {
	return r.VolumeID == o.VolumeID && r.TargetPath == o.TargetPath && slices.Equal(r.Refs(), o.Refs()) &&
		r.PullPolicy == o.PullPolicy && r.SubPath == o.SubPath && r.ReadOnly == o.ReadOnly &&
		r.Clone == o.Clone && r.StagingPath == o.StagingPath && r.Size == o.Size && r.SingleWriter == o.SingleWriter &&
		slices.Equal(r.MountOptions, o.MountOptions)
}

// Pod returns "namespace/name" of the record's pod, or "" when unknown.
func (r *Record) Pod() string {
	if r.PodName == "" {
		return ""
	}
	return r.PodNamespace + "/" + r.PodName
}

// Read loads a publish's record; nil if there is none. A record that is
// empty or does not decode, as a power failure can leave it, counts as none:
// its mount went with the power.
func Read(path string) (*Record, error) {
	var r Record
	found, err := atomicfile.ReadJSON(path, &r)
	switch {
	case found && err != nil:
		klog.ErrorS(err, "Ignoring a torn volume record (left by a power failure?)", "path", path)
		return nil, nil
	case !found || err != nil:
		return nil, err
	}
	return &r, nil
}

// Write replaces a record atomically: temp file, rename. It is not fsynced:
// a process crash loses nothing, and a power failure takes the mount the
// record describes with it.
func Write(path string, r *Record) error {
	return atomicfile.WriteJSON(path, r, 0o600, atomicfile.Options{})
}

// Volume is one publish on the node: its record and its key, the name of
// its directory, which is also the owner of its layer-cache references.
type Volume struct {
	Key string
	Record
}

// Each calls fn with every publish directory under the state root, in
// key order: its key, and its record (nil when there is none, or it is
// torn: a publish that crashed before writing it, or a power failure). A
// root without a volumes directory (the plugin never ran there) has none.
// It is the one listing of publishes.
func Each(root string, fn func(key string, rec *Record) error) error {
	entries, err := os.ReadDir(filepath.Join(root, Dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries { // ReadDir sorts by name
		if !e.IsDir() {
			continue
		}
		rec, err := Read(Publish(root, e.Name()).Record)
		if err != nil {
			return err
		}
		if err := fn(e.Name(), rec); err != nil {
			return err
		}
	}
	return nil
}

// List reads every publish's record under the state root, sorted by key;
// publishes without a record are left out.
func List(root string) ([]Volume, error) {
	var out []Volume
	err := Each(root, func(key string, rec *Record) error {
		if rec != nil {
			out = append(out, Volume{Key: key, Record: *rec})
		}
		return nil
	})
	return out, err
}
