package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/internal/atomicfile"
)

// A persistent clone is a volume provisioned through a StorageClass whose
// writes outlive its mounts: its overlay upper lives in a filesystem image
// of its own (package driver/clonefs), under clones/<volumeID>/, until its
// PersistentVolume is deleted.
//
//	clones/<volumeID>/clone.json   the Clone: pinned stack, capacity (fsynced)
//	clones/<volumeID>/stage.json   the CloneStage while it is staged
//	clones/<volumeID>/disk.img     the clone's sparse ext4 filesystem
//	clones/<volumeID>/fs/          its mount point, while staged
//	clones/<volumeID>/fs/upper     the overlay upper: the clone's writes
//	clones/<volumeID>/fs/work      overlayfs's work directory

// maxCloneID bounds a clone's volume id, a directory name.
const maxCloneID = 128

// Clone is clones/<volumeID>/clone.json. It is written when the clone is
// first staged, before anything it describes exists, and again only when
// the clone grows (CapacityBytes, after its filesystem holds the new
// size): the upper's base is the pinned stack, whatever its tags point to
// later.
type Clone struct {
	VolumeID string `json:"volumeID"`
	// CapacityBytes is the size the clone's writes may take (the PVC's
	// request, grown by NodeExpandVolume): the clone's filesystem has at
	// least that much room.
	CapacityBytes int64 `json:"capacityBytes"`
	// Stack is every image of the clone's base, bottom first, with the
	// digest each resolved to at the first stage.
	Stack []StackImage `json:"stack"`
	// Layers are the base's layers, bottom first, each once at its topmost
	// place (as Record.Layers): the overlay's lowers under the upper.
	Layers  []v1.Hash `json:"layers"`
	Created time.Time `json:"created"`
	// CloneOf is the volume id of the clone on this node whose writes
	// this clone started from (a claim cloned from another claim); ""
	// when it started from the image alone. Its disk.img is a copy of
	// that clone's, made after this record is written and renamed into
	// place only once complete: a clone with CloneOf and no disk.img is
	// not made yet.
	CloneOf string `json:"cloneOf,omitempty"`
}

// Refs returns the references of the clone's stack as the volume named
// them (tags or digests), bottom first.
func (c *Clone) Refs() []string {
	out := make([]string, 0, len(c.Stack))
	for _, im := range c.Stack {
		out = append(out, im.Image)
	}
	return out
}

// Owner is the layer-cache owner of the clone's references.
func (c *Clone) Owner() string { return CloneOwner(c.VolumeID) }

// CloneStage is clones/<volumeID>/stage.json: where the clone is staged.
// It says nothing once the staging path is no longer mounted (a reboot).
type CloneStage struct {
	StagingPath string    `json:"stagingPath"`
	ReadOnly    bool      `json:"readOnly"`
	Staged      time.Time `json:"staged"`
}

// CheckCloneID refuses a volume id that cannot name a clone's directory:
// empty, longer than 128 bytes, "." or "..", or with a byte other than
// ASCII letters, digits, '-', '_' and '.'. The controller's ids
// (strata-<hex>) always pass.
func CheckCloneID(id string) error {
	if id == "" || len(id) > maxCloneID || id == "." || id == ".." {
		return fmt.Errorf("volume id %q cannot name a clone: use 1 to %d letters, digits, '-', '_' or '.'", id, maxCloneID)
	}
	for _, c := range []byte(id) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'
		if !ok {
			return fmt.Errorf("volume id %q cannot name a clone: byte %q is not a letter, digit, '-', '_' or '.'", id, c)
		}
	}
	return nil
}

// ReadClone loads clone id's record; nil if there is none. A record that
// does not decode is an error: it pins the base of a clone's writes, and is
// fsynced, so it is never torn by a crash.
func ReadClone(root, id string) (*Clone, error) {
	if err := CheckCloneID(id); err != nil {
		return nil, err
	}
	var c Clone
	found, err := atomicfile.ReadJSON(ClonePathsOf(root, id).Record, &c)
	if !found || err != nil {
		return nil, err
	}
	return &c, nil
}

// WriteClone writes c to clones/<c.VolumeID>/clone.json, creating the
// directory: temp file, fsync, rename, fsync the directory, so that the
// record is on disk before anything it describes.
func WriteClone(root string, c *Clone) error {
	if err := CheckCloneID(c.VolumeID); err != nil {
		return err
	}
	paths := ClonePathsOf(root, c.VolumeID)
	if err := os.MkdirAll(paths.Dir, 0o700); err != nil {
		return err
	}
	if err := atomicfile.WriteJSON(paths.Record, c, 0o600, atomicfile.Options{Sync: true, SyncDir: true}); err != nil {
		return fmt.Errorf("write clone record: %w", err)
	}
	// The clones/ directory gained an entry.
	return atomicfile.SyncDir(filepath.Dir(paths.Dir))
}

// ReadCloneStage loads where clone id was last staged; nil if it is not
// staged (or there is no such clone).
func ReadCloneStage(root, id string) (*CloneStage, error) {
	if err := CheckCloneID(id); err != nil {
		return nil, err
	}
	var s CloneStage
	found, err := atomicfile.ReadJSON(ClonePathsOf(root, id).Stage, &s)
	switch {
	case found && err != nil:
		return nil, nil // torn by a power failure, which took the mount too
	case !found || err != nil:
		return nil, err
	}
	return &s, nil
}

// WriteCloneStage records where clone id is staged. Like Write it is not
// fsynced: a power failure takes the mount it describes with it.
func WriteCloneStage(root, id string, s *CloneStage) error {
	if err := CheckCloneID(id); err != nil {
		return err
	}
	return atomicfile.WriteJSON(ClonePathsOf(root, id).Stage, s, 0o600, atomicfile.Options{})
}

// RemoveCloneStage forgets that clone id is staged.
func RemoveCloneStage(root, id string) error {
	if err := CheckCloneID(id); err != nil {
		return err
	}
	err := os.Remove(ClonePathsOf(root, id).Stage)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// EachClone calls fn with every clone directory under the state root, in
// volume id order: the id, and its record, nil when there is none (a first
// stage that crashed before writing it, or a removal that crashed half-way)
// or, with readErr, when it cannot be read. Directories whose name is no
// clone id are skipped; a root without clones/ has none. It is the one
// listing of clones.
func EachClone(root string, fn func(id string, c *Clone, readErr error) error) error {
	entries, err := os.ReadDir(filepath.Join(root, ClonesDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries { // ReadDir sorts by name
		if !e.IsDir() || CheckCloneID(e.Name()) != nil {
			continue
		}
		c, err := ReadClone(root, e.Name())
		if err := fn(e.Name(), c, err); err != nil {
			return err
		}
	}
	return nil
}

// ListClones reads every clone's record under the state root, sorted by
// volume id. A directory without a record is left out; an unreadable
// record is an error.
func ListClones(root string) ([]Clone, error) {
	var out []Clone
	err := EachClone(root, func(_ string, c *Clone, err error) error {
		if c != nil {
			out = append(out, *c)
		}
		return err
	})
	return out, err
}
