package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync"

	"github.com/strata-csi/strata/driver/volumes"
)

// volumeRecord is volumes/<key>/volume.json (package volumes keeps the
// format, so that the strata CLI can read it too).
type volumeRecord = volumes.Record

// stackImage is one image of a volume's stack in its record.
type stackImage = volumes.StackImage

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
// upper and work are those of an uncapped upper, on the state root's
// filesystem; cappedUpper and cappedWork those of a capped one, in its own
// filesystem mounted at dir/fs (see upper.go).
type volumeDirs struct {
	dir, record, upper, work, mnt string
	cappedUpper, cappedWork       string
}

func (d *Driver) dirsOf(key string) volumeDirs {
	dir := filepath.Join(d.root, volumes.Dir, key)
	return volumeDirs{
		dir:    dir,
		record: filepath.Join(dir, volumes.RecordFile),
		upper:  filepath.Join(dir, volumes.UpperDir),
		work:   filepath.Join(dir, "work"),
		mnt:    filepath.Join(dir, "mnt"),

		cappedUpper: filepath.Join(dir, volumes.UpperFSDir, volumes.UpperDir),
		cappedWork:  filepath.Join(dir, volumes.UpperFSDir, "work"),
	}
}

// readRecord loads a publish's record; nil if there is none (or it is torn).
func readRecord(path string) (*volumeRecord, error) { return volumes.Read(path) }

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

// writeRecord replaces a record atomically.
func writeRecord(path string, r *volumeRecord) error { return volumes.Write(path, r) }

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
