package layercache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
)

// ownerRecord is what refs/<sha256(owner)>.json holds.
type ownerRecord struct {
	Owner    string    `json:"owner"`
	Layers   []v1.Hash `json:"layers"`
	Acquired time.Time `json:"acquired"`
}

// Acquire records that owner uses layers, replacing what owner used before.
// Prune never removes a layer that an owner holds. Every layer must be in the
// store (ErrLayerMissing otherwise: a prune may have removed it since Ensure;
// ensure again and retry). The check and the record happen under the store
// lock, so a concurrent prune either sees the reference or ran before the
// check.
func (s *Store) Acquire(owner string, layers []v1.Hash) error {
	if owner == "" {
		return errors.New("acquire: owner must not be empty")
	}
	data, err := json.Marshal(ownerRecord{Owner: owner, Layers: layers, Acquired: time.Now().UTC()})
	if err != nil {
		return err
	}
	l, err := s.lock()
	if err != nil {
		return err
	}
	defer l.unlock()
	for _, d := range layers {
		if !s.HasLayer(d) {
			return fmt.Errorf("%w: layer %s", ErrLayerMissing, d)
		}
	}
	if err := s.writeAtomic(s.ownerPath(owner), data); err != nil {
		return fmt.Errorf("record references of %s: %w", owner, err)
	}
	return nil
}

// Release drops owner's references and marks its layers used until now (a
// layer's last use is its meta file's mtime, or the acquire time of a
// current owner). Releasing an owner that holds nothing is not an error.
func (s *Store) Release(owner string) error {
	l, err := s.lock()
	if err != nil {
		return err
	}
	defer l.unlock()
	p := s.ownerPath(owner)
	var rec ownerRecord
	if err := readJSON(p, &rec); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("release references of %s: %w", owner, err)
	}
	now := time.Now()
	for _, d := range rec.Layers {
		if lp, err := s.layerPath(d); err == nil {
			_ = os.Chtimes(filepath.Join(lp, metaFile), now, now)
		}
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("release references of %s: %w", owner, err)
	}
	return nil
}

// Owners returns every owner's layers, read from disk.
func (s *Store) Owners() (map[string][]v1.Hash, error) {
	recs, err := s.ownerRecords()
	if err != nil {
		return nil, err
	}
	out := map[string][]v1.Hash{}
	for _, rec := range recs {
		out[rec.Owner] = rec.Layers
	}
	return out, nil
}

// ownerRecords reads every owner record.
func (s *Store) ownerRecords() ([]ownerRecord, error) {
	dir := filepath.Join(s.root, refsDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []ownerRecord
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var rec ownerRecord
		if err := readJSON(filepath.Join(dir, e.Name()), &rec); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // released meanwhile
			}
			return nil, err
		}
		out = append(out, rec)
	}
	return out, nil
}

// PruneResult says what a prune removed.
type PruneResult struct {
	Layers []v1.Hash
	Bytes  int64
}

// Prune removes every layer that no owner holds, and the image records that
// needed them. It is mark-and-sweep against the reference files on disk; the
// sweep re-checks them under the store lock, so it cannot race an Acquire.
func (s *Store) Prune(ctx context.Context) (PruneResult, error) {
	all := func(unused []LayerInfo, _ int64) []LayerInfo { return unused }
	res, err := s.evict(ctx, all)
	// The raw files of an artifact tree removed just now are unused only
	// once the tree is gone: a second pass removes them.
	if err == nil && len(res.Layers) > 0 {
		var more PruneResult
		more, err = s.evict(ctx, all)
		res.Layers, res.Bytes = append(res.Layers, more.Layers...), res.Bytes+more.Bytes
	}
	if err == nil {
		err = s.sweepPartials(0)
	}
	if len(res.Layers) > 0 {
		s.forgetUsage()
	}
	return res, err
}

// evictBatch is how many layers one hold of the store lock removes: the
// lock orders evictions against Acquire, and a publish must not wait for a
// thousand renames.
const evictBatch = 32

// evict removes the layers that choose picks among the unreferenced ones
// (given with the cache's total budget size, LayerMeta.BudgetSize). The
// choice is made from a snapshot taken without the lock; each batch of
// removals then takes the lock, reads the references again and skips a
// layer that an Acquire took meanwhile. A removal is a rename out of layers/, so a layer is either
// fully in the store or gone; the slow deletion happens after.
func (s *Store) evict(ctx context.Context, choose func(unused []LayerInfo, total int64) []LayerInfo) (res PruneResult, err error) {
	layers, err := s.Layers()
	if err != nil {
		return res, err
	}
	var unused []LayerInfo
	var total int64
	for _, m := range layers {
		total += m.BudgetSize()
		if len(m.Owners) == 0 {
			unused = append(unused, m)
		}
	}
	victims := choose(unused, total)
	if len(victims) == 0 {
		return res, nil
	}
	trash, err := os.MkdirTemp(s.work, "prune-")
	if err != nil {
		return res, err
	}
	defer func() {
		if rerr := os.RemoveAll(trash); err == nil && rerr != nil {
			err = rerr
		}
	}()
	for len(victims) > 0 && ctx.Err() == nil {
		batch := victims[:min(evictBatch, len(victims))]
		victims = victims[len(batch):]
		if err := s.evictBatch(batch, trash, &res); err != nil {
			return res, err
		}
	}
	if len(res.Layers) > 0 {
		if err := atomicfile.SyncDir(filepath.Join(s.root, layersDir)); err != nil {
			return res, err
		}
	}
	if err := s.pruneImageRecords(); err != nil {
		return res, err
	}
	return res, ctx.Err()
}

// evictBatch renames the layers of batch that no owner holds into trash,
// under the store lock.
func (s *Store) evictBatch(batch []LayerInfo, trash string, res *PruneResult) error {
	l, err := s.lock()
	if err != nil {
		return err
	}
	defer l.unlock()
	owners, err := s.ownerRecords()
	if err != nil {
		return err
	}
	inUse := map[v1.Hash]bool{}
	for _, o := range owners {
		for _, d := range o.Layers {
			inUse[d] = true
		}
	}
	for _, m := range batch {
		if inUse[m.DiffID] || m.Kind == kindRaw && s.linkedByTree(m.DiffID) {
			continue
		}
		p, err := s.layerPath(m.DiffID)
		if err != nil {
			continue
		}
		if err := os.Rename(p, filepath.Join(trash, m.DiffID.Hex)); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // removed by another process meanwhile
			}
			return fmt.Errorf("remove layer %s: %w", m.DiffID, err)
		}
		s.accessCache.Delete(m.DiffID)
		klog.V(2).InfoS("Removed unused layer", "layer", m.DiffID, "bytes", m.Size, "lastUsed", m.LastUsed)
		res.Layers = append(res.Layers, m.DiffID)
		res.Bytes += m.Size
	}
	return nil
}

// pruneImageRecords drops the resolution records of images whose layers are
// not all in the store any more, so that `ls` shows only usable images. The
// manifests and configs themselves stay: they are small and keep digest
// references resolvable offline.
func (s *Store) pruneImageRecords() error {
	imgs, err := s.Images()
	if err != nil {
		return err
	}
	for _, im := range imgs {
		if im.Complete {
			continue
		}
		if err := os.Remove(s.imageRefPath(im.Ref)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// LayerInfo describes one cached layer.
type LayerInfo struct {
	LayerMeta
	// LastUsed is when the layer was last pulled, acquired or released.
	LastUsed time.Time
	// Owners lists who holds the layer.
	Owners []string
}

// Layers lists the cached layers, with their owners.
func (s *Store) Layers() ([]LayerInfo, error) {
	dir := filepath.Join(s.root, layersDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	owners, err := s.ownerRecords()
	if err != nil {
		return nil, err
	}
	users := map[v1.Hash][]string{}
	acquired := map[v1.Hash]time.Time{}
	for _, o := range owners {
		for _, d := range o.Layers {
			users[d] = append(users[d], o.Owner)
			if o.Acquired.After(acquired[d]) {
				acquired[d] = o.Acquired
			}
		}
	}
	var out []LayerInfo
	for _, e := range entries {
		if !validHex(e.Name()) {
			continue
		}
		var info LayerInfo
		mp := filepath.Join(dir, e.Name(), metaFile)
		if err := readJSON(mp, &info.LayerMeta); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // pruned meanwhile
			}
			return nil, err
		}
		if st, err := os.Stat(mp); err == nil {
			info.LastUsed = st.ModTime()
		}
		if t := acquired[info.DiffID]; t.After(info.LastUsed) {
			info.LastUsed = t
		}
		info.Owners = users[info.DiffID]
		if info.Kind == kindRaw && s.linkedByTree(info.DiffID) {
			info.Owners = append(info.Owners, TreeOwner)
		}
		sort.Strings(info.Owners)
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].DiffID.Hex < out[j].DiffID.Hex })
	return out, nil
}

// ArtifactFile is one raw file of a cached artifact: its path in the
// volume, its entry in the store and its size.
type ArtifactFile struct {
	Path   string
	DiffID v1.Hash
	Size   int64
}

// ImageInfo describes one reference the store has resolved.
type ImageInfo struct {
	Ref      string
	Digest   v1.Hash // what the reference resolved to (manifest or index)
	Resolved time.Time
	// Layers lists the image's layers for this store's platform, bottom
	// first, when its manifest and config are cached.
	Layers []v1.Hash
	// Files lists an artifact's raw files, by path, which its tree (the
	// last of Layers) links; its ArtifactType is set.
	Files        []ArtifactFile
	ArtifactType string
	// Complete is true when every layer is in the store.
	Complete bool
	// Size is the content size of its layers that are in the store.
	Size int64
}

// Images lists the references the store has resolved, sorted by name.
func (s *Store) Images() ([]ImageInfo, error) {
	dir := filepath.Join(s.root, imageRefDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	sizes := map[v1.Hash]int64{}
	layers, err := s.Layers()
	if err != nil {
		return nil, err
	}
	for _, l := range layers {
		sizes[l.DiffID] = l.Size
	}
	var out []ImageInfo
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var rec imageRecord
		if err := readJSON(filepath.Join(dir, e.Name()), &rec); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, err
		}
		info := ImageInfo{Ref: rec.Ref, Digest: rec.Digest, Resolved: rec.Resolved}
		img, err := s.build(rec.Ref, rec.Digest, func(d v1.Hash, _ blobKind) ([]byte, error) { return s.readBlob(d) })
		if err == nil {
			info.Complete = true
			for _, l := range img.Layers {
				info.Layers = append(info.Layers, l.DiffID)
				sz, ok := sizes[l.DiffID]
				info.Complete = info.Complete && ok
				info.Size += sz
			}
			info.ArtifactType = img.ArtifactType
			for _, f := range img.Files {
				info.Files = append(info.Files, ArtifactFile{Path: f.Path, DiffID: f.Layer.DiffID, Size: f.Layer.Size})
				info.Size += sizes[f.Layer.DiffID]
			}
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// Usage summarizes the store's disk use.
type Usage struct {
	// Images counts the cached images by digest: references that resolved
	// to the same manifest are one image.
	Images int
	// Layers is the number of cached layers; Bytes their content size.
	Layers int
	Bytes  int64
	// InUseBytes is the size of layers that some owner holds.
	InUseBytes int64
	// SharedBytes is the size of layers that more than one cached image
	// (by digest) uses: space that would be paid twice without the cache.
	SharedBytes int64
	// UniqueBytes is the size of layers that exactly one cached image uses.
	UniqueBytes int64
	// SavedBytes is what the images would take if each had its own copy of
	// its layers, minus what they take.
	SavedBytes int64
}

// Usage computes the store's disk use from its layers and images.
func (s *Store) Usage() (Usage, error) {
	var u Usage
	layers, err := s.Layers()
	if err != nil {
		return u, err
	}
	imgs, err := s.Images()
	if err != nil {
		return u, err
	}
	// An image cached under two references (a tag and its digest) is one
	// image: counted by digest.
	users := map[v1.Hash]int{}
	counted := map[v1.Hash]bool{}
	for _, im := range imgs {
		if counted[im.Digest] {
			continue
		}
		counted[im.Digest] = true
		u.Images++
		seen := map[v1.Hash]bool{}
		ids := slices.Clone(im.Layers)
		for _, f := range im.Files {
			ids = append(ids, f.DiffID)
		}
		for _, d := range ids {
			if !seen[d] {
				seen[d] = true
				users[d]++
			}
		}
	}
	for _, l := range layers {
		u.Layers++
		u.Bytes += l.Size
		if len(l.Owners) > 0 {
			u.InUseBytes += l.Size
		}
		switch n := users[l.DiffID]; {
		case n > 1:
			u.SharedBytes += l.Size
			u.SavedBytes += int64(n-1) * l.Size
		case n == 1:
			u.UniqueBytes += l.Size
		}
	}
	return u, nil
}
