package layercache

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/atomicfile"
	"github.com/strata-csi/strata/layercache/unpack"
)

// LayerMeta is what layers/sha256/<diffID>/meta.json records about a layer.
type LayerMeta struct {
	DiffID         v1.Hash         `json:"diffID"`
	Digest         v1.Hash         `json:"digest"`
	MediaType      types.MediaType `json:"mediaType"`
	CompressedSize int64           `json:"compressedSize"`
	// Size is the logical size of the layer's regular-file content.
	Size int64 `json:"size"`
	// Files counts the regular files in the layer.
	Files int64 `json:"files"`
	// Entries counts the entries of the layer's tar (see BudgetSize).
	Entries int64     `json:"entries,omitempty"`
	Created time.Time `json:"created"`
	// Kind is empty for an image layer; for an artifact's entries it is
	// "artifact-tar" (a tar layer, keyed by its blob digest), "raw" (one
	// file, fs/blob) or "tree" (the hardlinks of its raw files).
	Kind string `json:"kind,omitempty"`
	// Parts are the raw entries that a tree links.
	Parts []v1.Hash `json:"parts,omitempty"`
}

// ProgressState is the phase of a layer in a progress event.
type ProgressState string

// Progress states.
const (
	LayerCached   ProgressState = "cached"   // already in the store
	LayerMissing  ProgressState = "missing"  // not in the store: this call fetches or joins it
	LayerFetching ProgressState = "fetching" // bytes are arriving
	LayerJoined   ProgressState = "joined"   // another caller is fetching it
	LayerDone     ProgressState = "done"     // committed to the store
)

// ProgressEvent reports the state of one layer.
type ProgressEvent struct {
	Layer Layer
	State ProgressState
	// Done is the number of compressed bytes read so far (LayerFetching).
	Done int64
}

// flight is one in-progress fetch of a layer, shared by every caller that
// needs it.
type flight struct {
	done chan struct{}
	err  error
	repo string // the repository it fetches from
}

// pending is one caller's wait for a layer's flight.
type pending struct {
	f        *flight
	src      *source
	pull     *pullMeter
	l        Layer
	progress func(ProgressEvent)
	again    bool // joined after a flight from another repository failed
}

// HasLayer reports whether the layer is committed in the store.
func (s *Store) HasLayer(diffID v1.Hash) bool {
	p, err := s.layerPath(diffID)
	if err != nil {
		return false
	}
	_, err = os.Lstat(filepath.Join(p, fsDir))
	return err == nil
}

// LayerDir returns the unpacked tree of a layer (its fs/ directory), for use
// as an overlayfs lower directory.
func (s *Store) LayerDir(diffID v1.Hash) (string, error) {
	p, err := s.layerPath(diffID)
	if err != nil {
		return "", err
	}
	return filepath.Join(p, fsDir), nil
}

// Pull resolves ref and ensures all its layers are in the store.
func (s *Store) Pull(ctx context.Context, ref string, o PullOptions) (*Image, error) {
	img, err := s.Resolve(ctx, ref, o)
	if err != nil {
		return nil, err
	}
	return img, s.Ensure(ctx, img, o)
}

// Ensure fetches and unpacks every layer of img that the store lacks, at most
// the configured number at a time. Each layer is fetched once however many
// callers need it at the same time. The fetches run on the store's own
// context: when ctx ends, Ensure returns ctx's error but the fetches go on,
// and a later Ensure of the same image joins them.
func (s *Store) Ensure(ctx context.Context, img *Image, o PullOptions) error {
	fetch := img.fetchLayers()
	var need int64
	for _, l := range fetch {
		if s.HasLayer(l.DiffID) {
			continue
		}
		if o.Policy == PullNever {
			return fmt.Errorf("%w: layer %s of %s is not in the node's cache and the pull policy is Never", ErrNotCached, l.DiffID, img.Ref)
		}
		need += l.Size
	}
	// The compressed size is a lower bound of what a layer takes unpacked.
	if err := s.makeRoom(ctx, img.Ref, need); err != nil {
		return err
	}
	h := s.reg.refresh()
	r, err := parseReference(h, img.Ref)
	if err != nil {
		return err
	}
	// The source connects on first need (a client per endpoint, kept).
	src := s.newSource(h, r.Context(), o.Keychain)
	connected := func() (*source, error) {
		if err := src.connect(ctx); err != nil {
			return nil, err
		}
		return src, nil
	}
	var waits []pending
	pull := &pullMeter{ref: img.Ref}
	for _, l := range fetch {
		if s.HasLayer(l.DiffID) {
			report(o.Progress, ProgressEvent{Layer: l, State: LayerCached})
			continue
		}
		// Reported before the fetch starts, so that a caller knows the pull
		// downloads before the first bytes arrive.
		report(o.Progress, ProgressEvent{Layer: l, State: LayerMissing})
		// A fetch in flight is joined without a connection of one's own:
		// a hundred publishes of one image do not each ask the registry
		// (checkLayers has the joiner's credentials checked).
		if f := s.joinFlight(l, o.Progress); f != nil {
			waits = append(waits, pending{f: f, src: src, pull: pull, l: l, progress: o.Progress})
			continue
		}
		src, err := connected()
		if err != nil {
			return err
		}
		waits = append(waits, pending{f: s.join(src, pull, l, o.Progress), src: src, pull: pull, l: l, progress: o.Progress})
	}
	if err := s.wait(ctx, img.Ref, waits); err != nil {
		return err
	}
	if err := s.ensureTree(img); err != nil {
		return err
	}
	// Whether cached before or fetched just now (perhaps by another
	// repository's fetch that this one joined, or that committed first),
	// each layer must be this repository's to hand out.
	if err := s.checkLayers(ctx, img, o, r.Context(), connected); err != nil {
		return err
	}
	if len(waits) > 0 {
		// The new layers are younger than the minimum age: GC evicts others.
		if res, err := s.GC(ctx); err != nil {
			klog.ErrorS(err, "Cache GC failed")
		} else if len(res.Layers) > 0 {
			klog.InfoS("Cache GC evicted unused layers", "layers", len(res.Layers), "bytes", res.Bytes)
		}
	}
	return nil
}

// wait waits for the fetches of ref's layers. A fetch that this caller
// joined, of the same blob from another repository, may fail where its own
// repository would serve the blob (the other one may even be a hostile
// registry that lied about holding it): such a layer is fetched again from
// the caller's repository.
func (s *Store) wait(ctx context.Context, ref string, waits []pending) error {
	var errs []error
	for i := 0; i < len(waits); i++ {
		w := waits[i]
		select {
		case <-w.f.done:
		case <-ctx.Done():
			return fmt.Errorf("pull %s: %w (the pull goes on in the background; retry to join it)", ref, ctx.Err())
		}
		switch own := w.src.registry().repo.Name(); {
		case w.f.err == nil:
		case w.f.repo != own && !w.again:
			waits = append(waits, pending{s.join(w.src, w.pull, w.l, w.progress), w.src, w.pull, w.l, w.progress, true})
		default:
			errs = append(errs, w.f.err)
		}
	}
	return errors.Join(errs...)
}

func report(p func(ProgressEvent), e ProgressEvent) {
	if p != nil {
		p(e)
	}
}

// join returns the flight fetching l, starting one if there is none, whose
// unpack counts in pull. The caller's progress function hears of the
// layer's completion as soon as it is committed.
func (s *Store) join(src *source, pull *pullMeter, l Layer, progress func(ProgressEvent)) *flight {
	ref := pull.ref
	key, repo := flightKey(l), src.registry().repo.Name()
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.joinFlightLocked(key, l, progress); f != nil {
		return f
	}
	f := &flight{done: make(chan struct{}), repo: repo}
	s.flights[key] = f
	if len(s.flights) == 1 {
		s.wg.Add(1)
		go s.flush()
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		start := time.Now()
		meta, err := s.fetchLayer(s.ctx, src, pull, l, progress)
		if err != nil {
			// The callers report the error; this records the layer's part.
			klog.V(2).InfoS("Layer fetch failed", "image", ref, "layer", l.DiffID, "err", err)
		} else if meta != nil {
			klog.V(1).InfoS("Layer unpacked", "image", ref, "layer", l.DiffID, "compressedBytes", meta.CompressedSize,
				"bytes", meta.Size, "files", meta.Files, "duration", time.Since(start).Round(time.Millisecond))
		}
		s.mu.Lock()
		delete(s.flights, key)
		s.mu.Unlock()
		f.err = err
		if err == nil {
			report(progress, ProgressEvent{Layer: l, State: LayerDone})
		}
		close(f.done)
	}()
	return f
}

// joinFlight joins the fetch of l in flight, if there is one.
func (s *Store) joinFlight(l Layer, progress func(ProgressEvent)) *flight {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.joinFlightLocked(flightKey(l), l, progress)
}

// joinFlightLocked joins the flight of key, if there is one: the caller's
// progress function hears that it joined, and of the layer's completion.
// The caller holds s.mu.
func (s *Store) joinFlightLocked(key string, l Layer, progress func(ProgressEvent)) *flight {
	f, ok := s.flights[key]
	if !ok {
		return nil
	}
	report(progress, ProgressEvent{Layer: l, State: LayerJoined})
	if progress != nil {
		go func() {
			<-f.done
			if f.err == nil {
				progress(ProgressEvent{Layer: l, State: LayerDone})
			}
		}()
	}
	return f
}

// flightKey identifies one fetch: of one blob of a layer. Callers that name
// the same blob in other repositories join it, so that images sharing a
// base download it once; a joined fetch proves nothing about the joiner's
// repository, which checkLayers then asks for proof unless the layer
// turned out public.
func flightKey(l Layer) string {
	return l.DiffID.Hex + " " + l.Digest.String()
}

// flushInterval is how often written layer data is pushed to the disk while
// layers are being unpacked.
const flushInterval = 250 * time.Millisecond

// flush runs while any layer is in flight and starts writeback of what the
// unpackers wrote, so that the disk works while the CPUs decompress, instead
// of idling until each layer's final syncfs. The kernel would otherwise hold
// the data dirty for up to 30 s or until gigabytes pile up.
func (s *Store) flush() {
	defer s.wg.Done()
	t := time.NewTicker(flushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		n := len(s.flights)
		s.mu.Unlock()
		if n == 0 {
			return
		}
		if err := syncFS(s.work); err != nil {
			klog.V(2).InfoS("Background flush failed", "err", err)
		}
	}
}

// fetchLayer fetches one layer from the first place of src that serves it
// whole and true (see downloadLayer), makes it durable and renames it into
// layers/. It returns nil meta when the layer was already there (committed
// by another process meanwhile).
func (s *Store) fetchLayer(ctx context.Context, src *source, pull *pullMeter, l Layer, progress func(ProgressEvent)) (_ *LayerMeta, err error) {
	ref := pull.ref
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	// The slot bounds downloads and unpacks (network and CPU); it is given
	// back before the syncfs below, which only waits for the disk.
	slot := true
	release := func() {
		if slot {
			slot = false
			<-s.sem
		}
	}
	defer release()
	dst, err := s.layerPath(l.DiffID)
	if err != nil {
		return nil, err
	}
	if s.HasLayer(l.DiffID) {
		return nil, nil
	}
	what := fmt.Sprintf("layer %s (blob %s) of %s", l.DiffID, l.Digest, ref)
	var tmp string
	var meta *LayerMeta
	// The unpacked layer holds its part of the budget until it is in
	// layers/, where it counts as committed, or gone.
	var meter *layerMeter
	defer func() {
		if meter != nil {
			meter.done(err == nil && meta != nil)
		}
	}()
	// A mirror's wrong or broken blob is dropped, and the next place asked.
	ep, err := src.do(ctx, what, func(c *client, attempts int) (err error) {
		tmp, meta, meter, err = s.downloadLayer(ctx, c, attempts, what, pull, l, progress)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if rerr := os.RemoveAll(tmp); rerr != nil {
				klog.ErrorS(rerr, "Could not remove a failed layer's files", "path", tmp)
			}
		}
	}()
	release()
	// The blob verified: its digest produces the diffID, and the
	// repository holds it.
	public, err := servedPublicly(ep, src.kc)
	if err != nil {
		return nil, err
	}
	repo := src.registry().repo.Name()
	access, err := json.Marshal(layerAccess{Digests: []v1.Hash{l.Digest}, Public: public, Repositories: []string{repo}})
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(tmp, accessFile), access, 0o644); err != nil {
		return nil, err
	}
	if err := syncFS(tmp); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, dst); err != nil {
		if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTEMPTY) {
			// Another fetch committed the same layer first; what this one
			// showed still goes on record.
			_ = os.RemoveAll(tmp)
			meta = nil
			return nil, s.noteLayerAccess(l.DiffID, l.Digest, repo, public)
		}
		return nil, fmt.Errorf("commit %s: %w", what, err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
		return nil, err
	}
	return meta, nil
}

// downloadLayer streams one layer blob from c through compressed-digest
// verification, decompression, diffID verification and unpacking into a new
// directory of the work directory, which it returns with the layer's meta
// and the meter holding its part of the budget (see layerMeter.done). On
// failure it leaves nothing behind, and has given back its budget.
func (s *Store) downloadLayer(ctx context.Context, c *client, attempts int, what string, pull *pullMeter, l Layer, progress func(ProgressEvent)) (_ string, _ *LayerMeta, _ *layerMeter, err error) {
	tmp, err := os.MkdirTemp(s.work, "layer-"+l.DiffID.Hex[:12]+"-")
	if err != nil {
		return "", nil, nil, err
	}
	meter := s.newLayerMeter(ctx, pull, l)
	defer func() {
		if err != nil {
			if rerr := os.RemoveAll(tmp); rerr != nil {
				klog.ErrorS(rerr, "Could not remove a failed layer's files", "path", tmp)
			}
			meter.done(false)
			pull.n.Add(-meter.used)
		}
	}()
	if err := os.Mkdir(filepath.Join(tmp, fsDir), 0o755); err != nil {
		return "", nil, nil, err
	}

	var stats unpack.Stats
	kind := ""
	if l.kind == artifactRaw && l.Size >= s.opts.ranged.minBytes {
		if stats, err = s.fetchRawResumable(ctx, c, what, l, filepath.Join(tmp, fsDir, rawBlobFile), meter, progress); err != nil {
			return "", nil, nil, err
		}
		return s.writeLayerMeta(tmp, l, kindRaw, l.Size, stats, meter)
	}
	body := &resumingReader{ctx: ctx, s: s, c: c, attempts: attempts, d: l.Digest, size: l.Size, what: what}
	n, err := body.open()
	if err != nil {
		return "", nil, nil, err
	}
	defer body.Close()
	if n >= 0 && l.Size > 0 && n != l.Size {
		return "", nil, nil, fmt.Errorf("%w: %s: %s sends %d bytes, manifest says %d", ErrDigestMismatch, what, c.repo.RegistryStr(), n, l.Size)
	}
	vr := &verifyReader{r: body, limit: l.Size, h: sha256.New(), what: what, progress: progress, layer: l}
	switch l.kind {
	case artifactRaw:
		kind = kindRaw
		stats, err = writeRaw(vr, filepath.Join(tmp, fsDir, rawBlobFile), what, meter)
	case artifactTar:
		// An artifact has no config listing diffIDs: its key is derived
		// from the blob digest, which covers what is unpacked.
		kind = kindArtifactTar
		stats, err = unpackStream(ctx, vr, filepath.Join(tmp, fsDir), nil, what, meter)
	default:
		stats, err = unpackStream(ctx, vr, filepath.Join(tmp, fsDir), &l.DiffID, what, meter)
	}
	if err != nil {
		return "", nil, nil, err
	}
	if err := vr.verify(l.Digest); err != nil {
		return "", nil, nil, err
	}
	return s.writeLayerMeta(tmp, l, kind, vr.n, stats, meter)
}

// writeLayerMeta writes the meta.json of a layer fetched into tmp.
func (s *Store) writeLayerMeta(tmp string, l Layer, kind string, compressed int64, stats unpack.Stats, meter *layerMeter) (string, *LayerMeta, *layerMeter, error) {
	meta := &LayerMeta{DiffID: l.DiffID, Digest: l.Digest, MediaType: l.MediaType, CompressedSize: compressed,
		Size: stats.Bytes, Files: stats.Files, Entries: stats.Entries, Created: time.Now().UTC(), Kind: kind}
	data, err := json.Marshal(meta)
	if err != nil {
		return "", nil, nil, err
	}
	if err := os.WriteFile(filepath.Join(tmp, metaFile), data, 0o644); err != nil {
		return "", nil, nil, err
	}
	return tmp, meta, meter, nil
}

// unpackStream decompresses r (gzip, zstd or plain tar, told apart by their
// magic numbers rather than by a media type that may lie), checks the
// diffID of the tar stream (unless diffID is nil), and unpacks it into dir,
// charging meter.
func unpackStream(ctx context.Context, r *verifyReader, dir string, diffID *v1.Hash, what string, meter *layerMeter) (unpack.Stats, error) {
	br := bufio.NewReaderSize(r, 256<<10)
	tarStream, closeStream, err := decompressed(br)
	if err != nil {
		return unpack.Stats{}, r.failure(err, what)
	}
	defer closeStream()
	dh := sha256.New()
	// Every byte of the tar stream counts against the layer's limits, also
	// those that are only read: the content of entries that are not
	// written, and what follows the tar's end.
	tee := &limitedReader{r: io.TeeReader(tarStream, dh), m: meter}
	stats, err := unpack.Apply(ctx, dir, tee, unpack.WithMeter(meter))
	if err == nil {
		// The tar's end-of-archive blocks and any padding count in the diffID.
		_, err = io.Copy(io.Discard, tee)
	}
	if err == nil {
		// Read the compressed stream to its end, so its digest covers it all.
		_, err = io.Copy(io.Discard, br)
	}
	if err != nil {
		if errors.Is(err, unpack.ErrUnsafe) {
			return stats, fmt.Errorf("%s: %w: nothing of it was kept", what, err)
		}
		if errors.Is(err, ErrNoSpace) {
			// Stopped by the budget or a layer limit: the rest of the
			// layer is neither read nor written.
			return stats, fmt.Errorf("%s (nothing of it was kept): %w", what, err)
		}
		return stats, r.failure(err, what)
	}
	if got := "sha256:" + hex.EncodeToString(dh.Sum(nil)); diffID != nil && got != diffID.String() {
		return stats, fmt.Errorf("%w: %s: uncompressed content has digest %s: nothing was stored", ErrDigestMismatch, what, got)
	}
	return stats, nil
}

// decompressed returns the tar stream of a layer blob read from br: gzip,
// zstd or plain tar, told apart by their magic numbers rather than by a
// media type that may lie. The caller calls the returned func when done.
func decompressed(br *bufio.Reader) (io.Reader, func(), error) {
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, err
		}
		return zr, func() { _ = zr.Close() }, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	}
	return br, func() {}, nil
}

// verifyReader hashes and counts a blob as it is read, and reports progress.
type verifyReader struct {
	r        io.Reader
	limit    int64 // expected size; 0 when unknown
	n        int64
	h        hash.Hash
	readErr  error
	what     string
	layer    Layer
	progress func(ProgressEvent)
	reported int64
}

func (v *verifyReader) Read(p []byte) (int, error) {
	if v.limit > 0 && v.n >= v.limit {
		return 0, io.EOF
	}
	if v.limit > 0 && int64(len(p)) > v.limit-v.n {
		p = p[:v.limit-v.n]
	}
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	if v.progress != nil && (v.n-v.reported >= 1<<20 || err != nil) {
		v.reported = v.n
		v.progress(ProgressEvent{Layer: v.layer, State: LayerFetching, Done: v.n})
	}
	if err != nil && err != io.EOF {
		v.readErr = err // classified by the resumingReader below
	}
	return n, err
}

// verify checks the size and digest of what was read.
func (v *verifyReader) verify(want v1.Hash) error {
	if v.limit > 0 && v.n != v.limit {
		return fmt.Errorf("%w: %s: got %d bytes, want %d: nothing was stored", ErrDigestMismatch, v.what, v.n, v.limit)
	}
	if got := "sha256:" + hex.EncodeToString(v.h.Sum(nil)); got != want.String() {
		return fmt.Errorf("%w: %s: blob has digest %s: nothing was stored", ErrDigestMismatch, v.what, got)
	}
	return nil
}

// failure explains an error met while reading a layer stream. A network
// error stays a network error; otherwise the rest of the blob is read so
// that a corrupted blob is reported as a digest mismatch, and a blob that
// matches its digest but does not decompress or untar as corrupt.
func (v *verifyReader) failure(err error, what string) error {
	if v.readErr != nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	// The node failed while writing the layer (a full disk, a quota, an I/O
	// error): its problem, not the blob's.
	for _, e := range nodeErrors {
		if errors.Is(err, e) {
			return fmt.Errorf("%s: %w: nothing was stored", what, err)
		}
	}
	if _, cerr := io.Copy(io.Discard, v); cerr != nil {
		return cerr
	}
	if v.readErr == nil {
		if verr := v.verify(v.layer.Digest); verr != nil {
			return verr
		}
	}
	return fmt.Errorf("%w: %s: %v: nothing was stored", ErrCorruptLayer, what, err)
}
