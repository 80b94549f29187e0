// Package capacity tells the scheduler how much room a new persistent clone
// has on a node, the way external-provisioner does for local-volume drivers:
// the node plugin measures its own state root (Measure) and publishes one
// CSIStorageCapacity object per Strata StorageClass for its node
// (Publisher); the controller answers GetCapacity for other nodes from
// those objects (Reader). The rule of what counts is in docs/clones.md
// ("How the scheduler sees a node's room").
package capacity

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/state"
)

const miB = 1 << 20

// Room is the room a new clone has on the node, and how it was reckoned.
type Room struct {
	// Available is what the state root's filesystem has free for an
	// unprivileged writer (statfs f_bavail): ext4's root reserve is not
	// counted, though the plugin runs as root, so that the node's own
	// services keep it.
	Available int64
	// CacheReserve is what the layer cache may still take under its
	// budget (the budget less the layers' size); 0 for an unbounded cache,
	// which may take anything and so reserves nothing it could be held to.
	CacheReserve int64
	// SparseReserve is what the sparse filesystem images already on the
	// node (clones' disk.img, capped uppers' disk.img) may still grow into:
	// each image's size less the blocks it holds; a clone whose image is
	// not made yet counts in full.
	SparseReserve int64
	// Capacity is Available less both reserves, rounded down to a MiB,
	// never negative: the node's disk a new clone may take.
	Capacity int64
	// MaximumVolumeSize is the largest claim (resources.requests.storage)
	// whose clone fits in Capacity, once its ext4 overhead is counted
	// (clonefs.ImageBytes), in whole MiB.
	MaximumVolumeSize int64
}

// Measure returns the room of a new clone on the filesystem of the state
// root, with cacheReserve bytes kept for the layer cache.
func Measure(root string, cacheReserve int64) (Room, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return Room{}, fmt.Errorf("measure the room for clones: statfs %s: %w", root, err)
	}
	sparse, err := sparseReserve(root)
	if err != nil {
		return Room{}, fmt.Errorf("measure the room for clones under %s: %w", root, err)
	}
	r := Room{Available: int64(st.Bavail) * st.Bsize, CacheReserve: max(cacheReserve, 0), SparseReserve: sparse}
	r.Capacity = max(r.Available-r.CacheReserve-r.SparseReserve, 0) / miB * miB
	r.MaximumVolumeSize = largestFitting(r.Capacity)
	return r, nil
}

// largestFitting is the largest clone size, in whole MiB, whose image
// fits in room bytes.
func largestFitting(room int64) int64 {
	lo, hi := int64(0), min(room/miB, clonefs.MaxSize/miB) // in MiB; lo fits
	for lo < hi {
		mid := lo + (hi-lo+1)/2
		if clonefs.ImageBytes(mid*miB) <= room {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	return lo * miB
}

// sparseReserve sums what the node's sparse images may still take: for
// each clone and each publish with a capped upper, its image's size less
// its allocated blocks; for a clone recorded without an image yet (a first
// stage under way), its whole image.
func sparseReserve(root string) (int64, error) {
	var total int64
	err := state.EachClone(root, func(id string, c *state.Clone, _ error) error {
		n, ok, err := growth(state.ClonePathsOf(root, id).Image)
		switch {
		case err != nil:
			return err
		case ok:
			total += n
		case c != nil:
			total += clonefs.ImageBytes(c.CapacityBytes)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("list clones: %w", err)
	}
	err = state.Each(root, func(key string, _ *state.Record) error {
		n, _, err := growth(state.Publish(root, key).Image)
		total += n
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("list volumes: %w", err)
	}
	return total, nil
}

// growth is how much more of the disk the sparse image img may take; ok is
// false when there is no image.
func growth(img string) (n int64, ok bool, err error) {
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("stat %s: %w", img, err)
	}
	return max(st.Size-st.Blocks*512, 0), true, nil
}
