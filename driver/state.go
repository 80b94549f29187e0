package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"
)

// volumeRecord is volumes/<key>/volume.json: everything needed to recognise
// a repeated publish and to undo a publish after a restart.
type volumeRecord struct {
	VolumeID   string    `json:"volumeID"`
	TargetPath string    `json:"targetPath"`
	Image      string    `json:"image"`
	PullPolicy string    `json:"pullPolicy"`
	SubPath    string    `json:"subPath,omitempty"`
	ReadOnly   bool      `json:"readOnly"`
	Digest     v1.Hash   `json:"digest"`
	Layers     []v1.Hash `json:"layers"` // bottom first
	Published  time.Time `json:"published"`
}

// sameRequest reports whether a publish asks for what r already is. The
// digest is not compared: a tag that moved applies to new publishes only.
func (r *volumeRecord) sameRequest(o *volumeRecord) bool {
	return r.VolumeID == o.VolumeID && r.TargetPath == o.TargetPath && r.Image == o.Image &&
		r.PullPolicy == o.PullPolicy && r.SubPath == o.SubPath && r.ReadOnly == o.ReadOnly
}

// volumeKey names one publish: a volume id at a target path.
func volumeKey(volumeID, targetPath string) string {
	sum := sha256.Sum256([]byte(volumeID + "\x00" + filepath.Clean(targetPath)))
	return hex.EncodeToString(sum[:16])
}

// isVolumeKey reports whether s has the form of a volumeKey (other owners
// of cache references, such as prepulled images, are not volumes).
func isVolumeKey(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// volumeDirs are the paths of one publish under the state root.
type volumeDirs struct {
	dir, record, upper, work, mnt string
}

func (d *Driver) dirsOf(key string) volumeDirs {
	dir := filepath.Join(d.root, "volumes", key)
	return volumeDirs{
		dir:    dir,
		record: filepath.Join(dir, "volume.json"),
		upper:  filepath.Join(dir, "upper"),
		work:   filepath.Join(dir, "work"),
		mnt:    filepath.Join(dir, "mnt"),
	}
}

// readRecord loads a publish's record; nil if there is none. A record that
// is empty or does not decode, as a power failure can leave it, counts as
// none: its mount went with the power.
func readRecord(path string) (*volumeRecord, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r volumeRecord
	if err := json.Unmarshal(data, &r); err != nil {
		klog.ErrorS(err, "Ignoring a torn volume record (left by a power failure?)", "path", path, "bytes", len(data))
		return nil, nil
	}
	return &r, nil
}

// records loads every publish's record on this node.
func (d *Driver) records() ([]*volumeRecord, error) {
	entries, err := os.ReadDir(filepath.Join(d.root, "volumes"))
	if err != nil {
		return nil, err
	}
	var out []*volumeRecord
	for _, e := range entries {
		rec, err := readRecord(d.dirsOf(e.Name()).record)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			out = append(out, rec)
		}
	}
	return out, nil
}

// writeRecord replaces a record atomically: temp file, rename. It is not
// fsynced (see layercache's writeFileAtomic for why): a process crash loses
// nothing, and a power failure takes the mount the record describes with it.
func writeRecord(path string, r *volumeRecord) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// inflight holds the keys of publishes with a call in progress. A second
// call on the same key fails fast with Aborted (kubelet retries) instead of
// queueing behind a pull that may take minutes.
type inflight struct {
	mu   sync.Mutex
	keys map[string]bool
}

func (f *inflight) tryLock(key string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.keys == nil {
		f.keys = map[string]bool{}
	}
	if f.keys[key] {
		return false
	}
	f.keys[key] = true
	return true
}

func (f *inflight) unlock(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.keys, key)
}
