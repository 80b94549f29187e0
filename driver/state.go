package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
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

// readRecord loads a publish's record; nil if there is none.
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
		return nil, fmt.Errorf("decode %s: %w", path, err)
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

// writeRecord writes a record durably: temp file, fsync, rename, fsync dir.
func writeRecord(path string, r *volumeRecord) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(data, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
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
