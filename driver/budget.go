package driver

import (
	"fmt"

	"github.com/strata-csi/strata/layercache"
)

// cacheBudget turns a percentage of the filesystem that holds root into a
// byte budget, when no byte count is given. The plugin's default is
// layercache.DefaultMaxPercent; a byte count given on the command line
// replaces it (cmd/strata-csi then passes percent 0).
func cacheBudget(b layercache.Budget, percent float64, root string) (layercache.Budget, error) {
	if percent == 0 {
		return b, nil
	}
	if b.MaxBytes != 0 {
		return b, fmt.Errorf("give the cache budget as bytes or as a percentage of the disk, not both")
	}
	n, err := layercache.DiskShare(root, percent)
	if err != nil {
		return b, err
	}
	b.MaxBytes = n
	return b, nil
}
