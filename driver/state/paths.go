package state

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
)

// The names of the node's state under the root. They are written here and
// nowhere else: every other package asks for a path.
const (
	// Dir holds one directory per publish, named by its Key.
	Dir = "volumes"
	// RecordFile is a publish's record in its directory.
	RecordFile = "volume.json"
	// ClonesDir holds one directory per persistent clone, named by its
	// volume id.
	ClonesDir = "clones"
	// CloneFile is a clone's record, CloneStageFile where it is staged.
	CloneFile      = "clone.json"
	CloneStageFile = "stage.json"
	// ImageFile is the sparse ext4 image of a filesystem of its own (a
	// clone's, or a capped upper's), and FSDir its mount point, both in the
	// directory of the clone or the publish (package clonefs).
	ImageFile = "disk.img"
	FSDir     = "fs"
	// UpperDir and WorkDir are an overlay's writable upper and work
	// directories: in a publish's directory when its upper is uncapped, in
	// FSDir when it has a filesystem of its own.
	UpperDir = "upper"
	WorkDir  = "work"
	// MountDir is where a publish with a subPath mounts the whole overlay,
	// privately, before it binds the sub-directory to the target.
	MountDir = "mnt"
	// UpperTemplatesDir holds the template images of capped uppers'
	// filesystems, one per size, remade at each start.
	UpperTemplatesDir = "upper-templates"
)

// Key names one publish: a volume id at a target path. A PersistentVolume
// can be published to several pods on a node, each at its own target.
func Key(volumeID, targetPath string) string {
	sum := sha256.Sum256([]byte(volumeID + "\x00" + filepath.Clean(targetPath)))
	return hex.EncodeToString(sum[:16])
}

// SingleWriterMark is the file, in the publishes' directory, that says a
// volume has (or had, after a crash) a single-writer publish on this node:
// without it, a publish of the volume need not look at the others.
func SingleWriterMark(root, volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return filepath.Join(root, Dir, "single-writer."+hex.EncodeToString(sum[:16]))
}

// IsKey reports whether s has the form of a Key.
func IsKey(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// PublishPaths are the files of one publish under the state root.
type PublishPaths struct {
	Dir    string // volumes/<key>
	Record string // volumes/<key>/volume.json
	// Upper and Work are those of an uncapped upper, on the state root's
	// filesystem.
	Upper, Work string
	// Image and FS are a capped upper's filesystem image and its mount;
	// CappedUpper and CappedWork are in it.
	Image, FS               string
	CappedUpper, CappedWork string
	// Mnt is the private mount of the overlay of a publish with a subPath.
	Mnt string
}

// Publish returns the paths of the publish key under root.
func Publish(root, key string) PublishPaths {
	dir := filepath.Join(root, Dir, key)
	fs := filepath.Join(dir, FSDir)
	return PublishPaths{
		Dir:         dir,
		Record:      filepath.Join(dir, RecordFile),
		Upper:       filepath.Join(dir, UpperDir),
		Work:        filepath.Join(dir, WorkDir),
		Image:       filepath.Join(dir, ImageFile),
		FS:          fs,
		CappedUpper: filepath.Join(fs, UpperDir),
		CappedWork:  filepath.Join(fs, WorkDir),
		Mnt:         filepath.Join(dir, MountDir),
	}
}

// Upper returns the upper directory of the publish key under root:
// volumes/<key>/fs/upper when the publish has a filesystem of its own for
// its writes (a size cap), else volumes/<key>/upper. A clone's publish
// (Record.Clone) has none: its writes are in Clone(root, VolumeID).Upper.
func Upper(root, key string) string {
	p := Publish(root, key)
	if _, err := os.Lstat(p.CappedUpper); err == nil {
		return p.CappedUpper
	}
	return p.Upper
}

// ClonePaths are the files of one persistent clone under the state root.
type ClonePaths struct {
	Dir    string // clones/<volumeID>
	Record string // clone.json
	Stage  string // stage.json
	// Image is the clone's filesystem image, FS its mount point while the
	// clone is staged; Upper (the clone's writes) and Work are in it.
	Image, FS   string
	Upper, Work string
}

// ClonePathsOf returns the paths of clone id under root. The id must pass
// CheckCloneID: it is joined into a path.
func ClonePathsOf(root, id string) ClonePaths {
	dir := filepath.Join(root, ClonesDir, id)
	fs := filepath.Join(dir, FSDir)
	return ClonePaths{
		Dir:    dir,
		Record: filepath.Join(dir, CloneFile),
		Stage:  filepath.Join(dir, CloneStageFile),
		Image:  filepath.Join(dir, ImageFile),
		FS:     fs,
		Upper:  filepath.Join(fs, UpperDir),
		Work:   filepath.Join(fs, WorkDir),
	}
}

// CloneDir is the directory of clone id under the state root.
func CloneDir(root, id string) string { return ClonePathsOf(root, id).Dir }

// CloneUpper is the overlay upper directory of clone id: the clone's
// writes. It exists only while the clone's filesystem is mounted (staged).
func CloneUpper(root, id string) string { return ClonePathsOf(root, id).Upper }

// UpperTemplates is the directory of the capped uppers' template images.
func UpperTemplates(root string) string { return filepath.Join(root, UpperTemplatesDir) }
