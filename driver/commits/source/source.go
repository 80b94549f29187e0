// Package source tells what a commit of a volume on this node starts from:
// the overlay upper directory that holds the volume's writes and the image
// it was mounted over, pinned by digest. It reads the node's volume records
// (driver/state) and knows nothing of the Kubernetes API, so that both the
// strata CLI and the node plugin's VolumeCommit watcher use it.
package source

import (
	"errors"
	"fmt"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache/commit"
)

// OfPublish returns the source of the publish v under the state root: its
// own upper directory, or, when v publishes a persistent clone, the
// clone's. A read-only publish has no writes to commit; the caller checks
// v.ReadOnly first to say so in its own terms.
func OfPublish(root string, v *state.Volume) (commit.Source, error) {
	if v.Clone {
		return OfClone(root, v.VolumeID)
	}
	return commit.Source{
		VolumeID: v.VolumeID, Upper: state.Upper(root, v.Key),
		Images: v.Refs(), Digest: v.Digest, CreatedBy: createdBy(v.VolumeID, v.Pod()),
	}, nil
}

// OfClone returns the source of persistent clone id under the state root:
// its upper directory and its pinned base; ErrNoClone when this node holds
// no such clone. Its upper exists only while the clone is staged (a pod
// that uses it runs on this node); commit.Volume says so when it is not.
func OfClone(root, id string) (commit.Source, error) {
	c, err := state.ReadClone(root, id)
	if err != nil {
		return commit.Source{}, fmt.Errorf("persistent clone %q: %w", id, err)
	}
	if c == nil {
		return commit.Source{}, fmt.Errorf("persistent clone %q: %w", id, ErrNoClone)
	}
	src := commit.Source{VolumeID: id, Upper: state.CloneUpper(root, id), Images: c.Refs(), CreatedBy: createdBy(id, "")}
	if len(c.Stack) > 0 {
		src.Digest = c.Stack[0].Digest
	}
	return src, nil
}

// HasClone reports whether this node holds persistent clone id.
func HasClone(root, id string) (bool, error) {
	if state.CheckCloneID(id) != nil {
		return false, nil // not a name a clone can have
	}
	c, err := state.ReadClone(root, id)
	return c != nil, err
}

// ErrNoClone: the node holds no persistent clone of that volume id.
var ErrNoClone = errors.New("no such persistent clone on this node")

// createdBy is the history entry of a commit's layer.
func createdBy(volumeID, pod string) string {
	s := "strata commit of volume " + volumeID
	if pod != "" {
		s += " (pod " + pod + ")"
	}
	return s
}
