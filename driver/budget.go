package driver

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/layercache"
)

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

// cacheBudget turns a percentage of the filesystem that holds root into a
// byte budget, when no byte count is given.
func cacheBudget(b layercache.Budget, percent float64, root string) (layercache.Budget, error) {
	if percent == 0 {
		return b, nil
	}
	if b.MaxBytes != 0 {
		return b, fmt.Errorf("give the cache budget as bytes or as a percentage of the disk, not both")
	}
	if percent < 0 || percent > 100 {
		return b, fmt.Errorf("cache budget %g%%: want a percentage between 0 and 100", percent)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return b, fmt.Errorf("statfs %s: %w", root, err)
	}
	b.MaxBytes = int64(float64(st.Blocks) * float64(st.Bsize) * percent / 100)
	return b, nil
}
