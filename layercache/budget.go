package layercache

import (
	"context"
	"fmt"
	"sort"
	"time"
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
// budget it does nothing.
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
	return res, err
}

// countEvicted adds what the budget evicted to the store's counters.
func (s *Store) countEvicted(res PruneResult) {
	s.evictedLayers.Add(int64(len(res.Layers)))
	s.evictedBytes.Add(res.Bytes)
}

// makeRoom evicts unused layers so that need more bytes fit in the budget,
// or fails with ErrNoSpace saying how much is missing.
func (s *Store) makeRoom(ctx context.Context, ref string, need int64) error {
	b := s.opts.budget
	if b.MaxBytes == 0 || need == 0 {
		return nil
	}
	var short int64
	res, err := s.evict(ctx, func(unused []LayerInfo, total int64) []LayerInfo {
		over := total + need - b.MaxBytes
		if over <= 0 {
			return nil
		}
		// Make room down to the low watermark if that is possible, so the
		// next pull does not evict again; at least enough for this one.
		want := max(over, total+need-int64(b.Low*float64(b.MaxBytes)))
		victims := s.oldestUnused(unused, want)
		var freed int64
		for _, v := range victims {
			freed += v.Size
		}
		if freed < over {
			short = over - freed
		}
		return victims
	})
	s.countEvicted(res)
	if err != nil {
		return err
	}
	if short > 0 {
		return fmt.Errorf("%w: pulling %s needs at least %d more bytes than the cache budget of %d bytes allows; "+
			"the rest is held by published volumes or used in the last %s: raise --cache-max-bytes or free the node",
			ErrNoSpace, ref, short, b.MaxBytes, b.MinAge)
	}
	return nil
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
		got += l.Size
	}
	return out
}
