package layercache

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache/unpack"
)

// Budget bounds the cache's size. Layers that no owner holds are evicted,
// least recently used first; a held layer is never evicted.
type Budget struct {
	// MaxBytes is the most content the cache keeps; 0 means no bound.
	MaxBytes int64
	// High and Low are fractions of MaxBytes: when the cache grows past
	// High, unused layers are evicted until it is under Low (defaults 0.9
	// and 0.8). The gap keeps every pull from triggering an eviction.
	High, Low float64
	// MinAge protects layers used more recently than this (default 10
	// minutes): an image pulled a moment ago for a pod that is about to
	// start must not be evicted before the pod publishes it.
	MinAge time.Duration
}

// DefaultMaxPercent is the cache budget, as a share of the filesystem that
// holds the store, that the plugin and the CLI use unless told otherwise
// (--cache-max-percent; --cache-max-bytes overrides it). An unbounded cache
// lets any pod that names a big enough image fill the node's disk; half of
// it leaves the rest to the volumes' writable layers, kubelet, the
// container runtime, and kubelet's eviction threshold (10% free).
const DefaultMaxPercent = 50

// DiskShare returns percent of the size of the filesystem that holds path.
func DiskShare(path string, percent float64) (int64, error) {
	if percent < 0 || percent > 100 {
		return 0, fmt.Errorf("cache budget %g%%: want a percentage between 0 and 100", percent)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(float64(st.Blocks) * float64(st.Bsize) * percent / 100), nil
}

// BudgetOf returns b with its byte count set to percent of the filesystem
// that holds root, when percent is not 0 (the plugin's default is
// DefaultMaxPercent); a budget given both ways is an error.
func BudgetOf(b Budget, percent float64, root string) (Budget, error) {
	if percent == 0 {
		return b, nil
	}
	if b.MaxBytes != 0 {
		return b, fmt.Errorf("give the cache budget as bytes or as a percentage of the disk, not both")
	}
	n, err := DiskShare(root, percent)
	if err != nil {
		return b, err
	}
	b.MaxBytes = n
	return b, nil
}

// FormatBytes writes n as ParseBytes reads it back: with the largest binary
// suffix (Ki, Mi, Gi, Ti) that divides it, e.g. "100Gi", else in bytes.
func FormatBytes(n int64) string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"Ti", 1 << 40}, {"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10}} {
		if n != 0 && n%u.mult == 0 {
			return strconv.FormatInt(n/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// ParseBytes parses a size as Kubernetes writes quantities: a plain number of
// bytes, or one with a decimal (k, M, G, T) or binary (Ki, Mi, Gi, Ti)
// suffix, e.g. "50Gi".
func ParseBytes(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}}
	num, mult := strings.TrimSpace(s), int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = n, u.mult
			break
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a byte count such as 53687091200, 50G or 50Gi", s)
	}
	return v * mult, nil
}

// Default watermarks and minimum age of a Budget.
const (
	DefaultHighWatermark = 0.9
	DefaultLowWatermark  = 0.8
	DefaultMinAge        = 10 * time.Minute
)

// WithBudget bounds the cache's size (see Budget).
func WithBudget(b Budget) Option {
	return func(o *options) error {
		if b.MaxBytes < 0 {
			return fmt.Errorf("cache budget: max bytes %d is negative", b.MaxBytes)
		}
		if b.High == 0 {
			b.High = DefaultHighWatermark
		}
		if b.Low == 0 {
			b.Low = DefaultLowWatermark
		}
		if b.MinAge == 0 {
			b.MinAge = DefaultMinAge
		}
		if !(0 < b.Low && b.Low <= b.High && b.High <= 1) {
			return fmt.Errorf("cache budget: watermarks must satisfy 0 < low (%g) <= high (%g) <= 1", b.Low, b.High)
		}
		if b.MinAge < 0 {
			return fmt.Errorf("cache budget: min age %s is negative", b.MinAge)
		}
		o.budget = b
		return nil
	}
}

// GC enforces the budget: when the cache holds more than the high
// watermark, unused layers older than the minimum age are evicted, least
// recently used first, until it holds less than the low watermark. Without a
// budget it does nothing. Sizes are budget sizes (LayerMeta.BudgetSize).
func (s *Store) GC(ctx context.Context) (PruneResult, error) {
	b := s.opts.budget
	if b.MaxBytes == 0 {
		return PruneResult{}, nil
	}
	high, low := int64(b.High*float64(b.MaxBytes)), int64(b.Low*float64(b.MaxBytes))
	res, err := s.evict(ctx, func(unused []LayerInfo, total int64) []LayerInfo {
		if total <= high {
			return nil
		}
		return s.oldestUnused(unused, total-low)
	})
	s.countEvicted(res)
	if len(res.Layers) > 0 {
		s.forgetUsage()
	}
	return res, err
}

// countEvicted adds what the budget evicted to the store's counters.
func (s *Store) countEvicted(res PruneResult) {
	s.evictedLayers.Add(int64(len(res.Layers)))
	s.evictedBytes.Add(res.Bytes)
}

// makeRoom evicts unused layers so that need more bytes fit in the budget
// besides what unpacks in progress reserved, or fails with ErrNoSpace
// saying how much is missing. It also measures the cache for the
// reservation.
func (s *Store) makeRoom(ctx context.Context, ref string, need int64) error {
	if s.opts.budget.MaxBytes == 0 || need == 0 {
		return nil
	}
	r := &s.res
	r.mu.Lock()
	defer r.mu.Unlock()
	short, err := s.makeRoomLocked(ctx, r.inflight+need)
	if err != nil {
		return err
	}
	if short > 0 {
		return s.noSpace(ref, short, 0)
	}
	return nil
}

// makeRoomLocked measures the cache and evicts unused layers so that need
// more bytes fit in the budget, and returns how many bytes are still
// missing. It sets s.res.committed; the caller holds s.res.mu.
func (s *Store) makeRoomLocked(ctx context.Context, need int64) (short int64, err error) {
	b := s.opts.budget
	var total, over int64
	var victims []LayerInfo
	res, err := s.evict(ctx, func(unused []LayerInfo, t int64) []LayerInfo {
		total = t
		over = total + need - b.MaxBytes
		if over <= 0 {
			return nil
		}
		// Make room down to the low watermark if that is possible, so the
		// next pull does not evict again; at least enough for this one.
		want := max(over, total+need-int64(b.Low*float64(b.MaxBytes)))
		victims = s.oldestUnused(unused, want)
		return victims
	})
	s.countEvicted(res)
	// What was evicted: a victim that an Acquire took meanwhile stays.
	gone := map[v1.Hash]bool{}
	for _, d := range res.Layers {
		gone[d] = true
	}
	var freed int64
	for _, v := range victims {
		if gone[v.DiffID] {
			freed += v.BudgetSize()
		}
	}
	s.res.committed = total - freed
	if err != nil {
		s.res.committed = -1
		return 0, err
	}
	return max(over-freed, 0), nil
}

// oldestUnused picks unused layers older than the minimum age, least
// recently used first, until they add up to at least want bytes.
func (s *Store) oldestUnused(unused []LayerInfo, want int64) []LayerInfo {
	cutoff := time.Now().Add(-s.opts.budget.MinAge)
	sort.Slice(unused, func(i, j int) bool { return unused[i].LastUsed.Before(unused[j].LastUsed) })
	var out []LayerInfo
	var got int64
	for _, l := range unused {
		if got >= want {
			break
		}
		if l.LastUsed.After(cutoff) {
			continue
		}
		out = append(out, l)
		got += l.BudgetSize()
	}
	return out
}

// Limits bound what one layer may take unpacked, whatever the cache budget.
// Every byte of a layer is untrusted: its manifest states only its
// compressed size, and a layer of a megabyte can unpack to a gigabyte (gzip
// reaches about 1032:1, zstd more). A layer that passes a limit stops as it
// is written, and nothing of it is kept.
type Limits struct {
	// MaxExpansion is how many times its compressed size a layer may take
	// unpacked (as counted against the budget, or as its uncompressed tar
	// stream if that is more); 0: no ceiling. The ceiling is never
	// below ExpansionFloor, so that a small layer of very compressible
	// files is not refused.
	MaxExpansion   float64
	ExpansionFloor int64
	// MaxLayerBytes is the most one layer may take unpacked; 0: no limit.
	MaxLayerBytes int64
}

// Default layer limits.
const (
	// DefaultMaxExpansion: real layers compress 2-5x (binaries, libraries,
	// text; already compressed media 1x), and even very compressible data
	// such as logs, CSV or JSON stays under about 20x with gzip and 30x
	// with zstd -19 (see docs/layercache.md). 100x leaves room for that and
	// still stops a bomb at a tenth of gzip's ratio.
	DefaultMaxExpansion = 100
	// DefaultExpansionFloor: a tiny layer, say 100 bytes that hold a 1 MiB
	// file of zeros, expands far past 100x and is harmless; 64 MiB is
	// nothing on a node's disk.
	DefaultExpansionFloor = 64 << 20
	// DefaultMaxLayerBytes: larger than any real single layer (a model's
	// largest weight shards are tens of GB), and a bound on the disk and CPU
	// time one layer can take when the cache budget is set unbounded.
	DefaultMaxLayerBytes = 100 << 30
)

// DefaultLimits are the limits of a store opened without WithLayerLimits.
var DefaultLimits = Limits{MaxExpansion: DefaultMaxExpansion, ExpansionFloor: DefaultExpansionFloor, MaxLayerBytes: DefaultMaxLayerBytes}

// WithLayerLimits sets the limits of one layer (default DefaultLimits). A
// zero field turns its limit off.
func WithLayerLimits(l Limits) Option {
	return func(o *options) error {
		if l.MaxExpansion < 0 || l.ExpansionFloor < 0 || l.MaxLayerBytes < 0 {
			return fmt.Errorf("layer limits %+v: none may be negative (0 turns a limit off)", l)
		}
		if l.MaxExpansion > 0 && l.MaxExpansion < 1 {
			return fmt.Errorf("layer limits: max expansion %g is under 1: a layer never takes less than its compressed size unpacked", l.MaxExpansion)
		}
		o.limits = l
		return nil
	}
}

// EntryBytes is what each tar entry counts against the budget and the
// layer limits besides its content: about what an entry takes on disk
// beyond its content bytes. On ext4 with 4 KiB blocks a directory takes a
// block, a file's last block is on average half empty, and every entry
// takes a 256-byte inode and a directory entry; 4 KiB covers the worst of
// these. Without it a layer of a million empty files would cost nothing.
const EntryBytes = 4096

// BudgetSize is what a layer counts against the cache budget: its content
// plus EntryBytes for each of its tar entries (for a layer recorded before
// entries were counted, for each of its files).
func (m LayerMeta) BudgetSize() int64 {
	n := m.Entries
	if n == 0 {
		n = m.Files
	}
	return m.Size + n*EntryBytes
}

// MinFreeInodes is the share of its inodes that an unpack leaves free on
// the filesystem of the store: the bytes of a budget do not bound inodes,
// which ext4 fixes when it is made (one per 16 KiB by default), and a
// layer of empty files would run the node out of them inside any byte
// budget. Kubelet evicts pods when less than 5% are free.
const MinFreeInodes = 0.10

// inodeCheckEvery is how many entries an unpack creates between checks of
// the free inodes (a statfs each).
const inodeCheckEvery = 256

// checkInodes fails when the store's filesystem has less than
// MinFreeInodes of its inodes free.
func (s *Store) checkInodes(ref string, entries int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(s.work, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", s.work, err)
	}
	// A filesystem that allocates inodes as it goes (btrfs) reports none.
	if st.Files == 0 || float64(st.Ffree) >= MinFreeInodes*float64(st.Files) {
		return nil
	}
	return fmt.Errorf("%w: pulling %s stopped after %d entries of a layer: the cache's filesystem has %d of its %d inodes free, "+
		"and unpacks leave %g%% of them free: free the node (strata prune), or give the state root a filesystem with more inodes (mkfs.ext4 -i)",
		ErrNoSpace, ref, entries, st.Ffree, st.Files, MinFreeInodes*100)
}

// reservation is the part of the budget that unpacks in progress hold, and
// what the committed layers took when last measured. Every unpack of the
// process takes its space from it before writing, so that layers unpacked
// at the same time, for one image or for several, together stay within the
// budget.
type reservation struct {
	mu sync.Mutex
	// committed is the budget size of the layers in layers/ when last
	// measured (by makeRoom), plus what was committed since; -1: unknown.
	committed int64
	// inflight is what unpacks in progress reserved.
	inflight int64
}

// reserveChunk is how much of the budget an unpack reserves at a time, so
// that the shared reservation is not taken for every write.
const reserveChunk = 1 << 20

// reserve takes n bytes of the budget for an unpack of ref in progress,
// first evicting unused layers if they are needed. pulled is what ref's pull
// unpacked so far, for the message.
func (s *Store) reserve(ctx context.Context, ref string, n, pulled int64) error {
	if s.opts.budget.MaxBytes == 0 {
		return nil
	}
	r := &s.res
	r.mu.Lock()
	defer r.mu.Unlock()
	if s.takeFreeLocked(n) {
		return nil
	}
	short, err := s.makeRoomLocked(ctx, r.inflight+n)
	if err != nil {
		return err
	}
	if short > 0 {
		return s.noSpace(ref, short, pulled)
	}
	r.inflight += n
	return nil
}

// tryReserve takes n bytes of the budget if they are free without
// measuring or evicting.
func (s *Store) tryReserve(n int64) bool {
	if s.opts.budget.MaxBytes == 0 {
		return true
	}
	s.res.mu.Lock()
	defer s.res.mu.Unlock()
	return s.takeFreeLocked(n)
}

// takeFreeLocked reserves n bytes if the last measure of the cache shows
// them free; the caller holds s.res.mu.
func (s *Store) takeFreeLocked(n int64) bool {
	r := &s.res
	if r.committed >= 0 && r.committed+r.inflight+n <= s.opts.budget.MaxBytes {
		r.inflight += n
		return true
	}
	return false
}

// unreserve gives back n reserved bytes of an unpack that ended, and adds
// committed bytes when its layer went into layers/.
func (s *Store) unreserve(n, committed int64) {
	if s.opts.budget.MaxBytes == 0 {
		return
	}
	r := &s.res
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inflight -= n
	if r.committed >= 0 {
		r.committed += committed
	}
}

// forgetUsage makes the next reservation measure the cache again, after
// layers left it other than through the reservation (GC, prune).
func (s *Store) forgetUsage() {
	s.res.mu.Lock()
	s.res.committed = -1
	s.res.mu.Unlock()
}

// noSpace is the error of a pull that the budget cannot hold.
func (s *Store) noSpace(ref string, short, pulled int64) error {
	b := s.opts.budget
	return fmt.Errorf("%w: pulling %s needs at least %d more bytes than the cache budget of %d bytes allows "+
		"(%d bytes unpacked so far); the rest is held by published volumes, layers used in the last %s or other pulls in progress: "+
		"raise --cache-max-bytes or --cache-max-percent, or free the node",
		ErrNoSpace, ref, short, b.MaxBytes, pulled, b.MinAge)
}

// pullMeter counts what one Ensure unpacked, across its layers.
type pullMeter struct {
	ref string
	n   atomic.Int64
}

// layerMeter is the unpack.Meter of one layer's unpack: it enforces the
// layer limits and takes the budget from the store's reservation.
type layerMeter struct {
	ctx           context.Context
	s             *Store
	pull          *pullMeter
	compressed    int64
	limit         int64 // 0: none
	expansion     bool  // limit is the expansion ceiling (else the absolute one)
	used, granted int64 // charged, and reserved from the store's budget
	read          int64 // bytes of the tar stream read (see limitedReader)
	entries       int64
}

var _ unpack.Meter = (*layerMeter)(nil)

// newLayerMeter meters the unpack of l for pull.
func (s *Store) newLayerMeter(ctx context.Context, pull *pullMeter, l Layer) *layerMeter {
	m := &layerMeter{ctx: ctx, s: s, pull: pull, compressed: l.Size}
	lim := s.opts.limits
	if lim.MaxExpansion > 0 {
		m.limit = max(int64(lim.MaxExpansion*float64(max(l.Size, 0))), lim.ExpansionFloor)
		m.expansion = true
	}
	if lim.MaxLayerBytes > 0 && (m.limit == 0 || lim.MaxLayerBytes < m.limit) {
		m.limit, m.expansion = lim.MaxLayerBytes, false
	}
	return m
}

// Entry implements unpack.Meter: an entry counts EntryBytes, and now and
// then the filesystem's free inodes are checked.
func (m *layerMeter) Entry() error {
	m.entries++
	if m.entries%inodeCheckEvery == 0 {
		if err := m.s.checkInodes(m.pull.ref, m.entries); err != nil {
			return err
		}
	}
	return m.charge(EntryBytes)
}

// Content implements unpack.Meter.
func (m *layerMeter) Content(n int64) error { return m.charge(n) }

// charge checks the layer's limits and takes n bytes of the budget.
func (m *layerMeter) charge(n int64) error {
	m.used += n
	pulled := m.pull.n.Add(n)
	if err := m.checkLimit(); err != nil {
		return err
	}
	if m.used <= m.granted {
		return nil
	}
	need := m.used - m.granted
	// A chunk if it is free; only what this write needs is worth an
	// eviction.
	if chunk := max(need, reserveChunk); m.s.tryReserve(chunk) {
		m.granted += chunk
		return nil
	}
	if err := m.s.reserve(m.ctx, m.pull.ref, need, pulled-n); err != nil {
		return err
	}
	m.granted += need
	return nil
}

// checkLimit fails once the layer passes its limit.
func (m *layerMeter) checkLimit() error {
	if m.limit > 0 && max(m.used, m.read) > m.limit {
		if m.expansion {
			return fmt.Errorf("%w: it unpacks to more than %d bytes, over %g times its compressed size of %d bytes "+
				"(--layer-max-expansion; the ceiling is never under %d bytes): a decompression bomb, or an unusually "+
				"compressible layer; if you trust the image, raise --layer-max-expansion",
				ErrLayerTooLarge, m.limit, m.s.opts.limits.MaxExpansion, m.compressed, m.s.opts.limits.ExpansionFloor)
		}
		return fmt.Errorf("%w: it unpacks to more than %d bytes, the most one layer may take (--layer-max-bytes): "+
			"if you trust the image, raise --layer-max-bytes", ErrLayerTooLarge, m.limit)
	}
	return nil
}

// limitedReader reads a layer's tar stream within the layer's limits.
type limitedReader struct {
	r io.Reader
	m *layerMeter
}

func (l *limitedReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	l.m.read += int64(n)
	if lerr := l.m.checkLimit(); lerr != nil {
		return n, lerr
	}
	return n, err
}

// done gives the meter's reservation back; committed tells whether the
// layer went into layers/, where it now counts.
func (m *layerMeter) done(committed bool) {
	var c int64
	if committed {
		c = m.used
	}
	m.s.unreserve(m.granted, c)
	m.granted = 0
}
