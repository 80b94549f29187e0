package clonefs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/atomicfile"
)

const (
	miB       = 1 << 20
	blockSize = 4096 // ext4 block size of every image (mkfs -b)
	// maxMiB is the largest size the image label can record ("strata-" +
	// 8 digits + "M" fills ext4's 16-byte label): about 95 TiB, far above
	// the 16 TiB file size limit of an ext4 node disk.
	maxMiB = 99_999_999
	// MaxSize is the largest size of an image, in bytes (maxMiB).
	MaxSize = maxMiB * miB
	// labelPrefix and labelSuffix frame the requested size in MiB in the
	// image's ext4 label.
	labelPrefix, labelSuffix = "strata-", "M"
	// tempPrefix names the image while it is being formatted; Create removes
	// files with this prefix left by a crash.
	tempPrefix = "." + state.ImageFile + ".tmp-"
	// maxPasses bounds the format-measure-grow loop; one pass is the rule.
	maxPasses = 5

	// Journal bounds, in MiB: size/64 within these. The kernel's minimum is
	// 1024 blocks; past 128 MiB a bigger journal buys little for one clone.
	minJournalMiB, maxJournalMiB = 4, 128
	// kernelReserveMax is the cap, in blocks, of the reserve ext4 keeps
	// from unprivileged writers whatever -m says (2% of the blocks, at most
	// 4096 clusters: ext4_calculate_resv_clusters in fs/ext4/super.c).
	kernelReserveMax = 4096
)

// features is the image's ext4 feature set, given in full ("none" first) so
// that it does not depend on the mke2fs.conf of whatever host or image runs
// mkfs. Every feature here is mounted by Linux 3.18 and later; orphan_file and
// metadata_csum_seed (newer kernels) are left out, and so is resize_inode,
// whose reserved GDT blocks would be overhead a clone never uses.
var features = strings.Join([]string{
	"none", "has_journal", "ext_attr", "dir_index", "filetype", "extent", "flex_bg",
	"sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize", "64bit", "metadata_csum",
}, ",")

// journalMiB is the journal size for an image of want MiB usable space.
func journalMiB(want int64) int64 {
	return min(max(want/64, minJournalMiB), maxJournalMiB)
}

// estimateBlocks is the first guess at the image's size in blocks for
// wantBlocks of free space (see the package comment); format corrects it.
func estimateBlocks(wantBlocks, journalBlocks int64) int64 {
	data := wantBlocks + journalBlocks
	// Inode tables take 1/64 of the image (256-byte inodes, one per 16 KiB),
	// so the image is data*64/63; bitmaps, descriptors and superblock backups
	// fit in the extra 1/1024 and the 64 blocks.
	total := data*64/63 + data/1024 + 64
	total += min(total/50, kernelReserveMax)
	// mke2fs refuses a journal of more than half the filesystem.
	return max(total, 2*journalBlocks+64)
}

// mkfsTool finds mkfs.ext4: in PATH, else where e2fsprogs installs it (a
// non-login PATH often lacks the sbin directories).
func mkfsTool() (string, error) {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("mkfs.ext4 not found in PATH, /usr/sbin or /sbin: persistent clones need e2fsprogs; " +
		"run the node plugin from the strata-csi image, which ships mkfs.ext4, or install e2fsprogs")
}

// format makes dir/disk.img for want MiB: format a temp file in dir, measure,
// grow and format again if short, fsync, rename, fsync dir. A scratch image
// (see scratch.go) has no journal.
func format(ctx context.Context, dir, img string, want int64, scratch bool) (err error) {
	start := time.Now()
	tool, err := mkfsTool()
	if err != nil {
		return err
	}
	wantBlocks := want * miB / blockSize
	jMiB := journalMiB(want)
	if scratch {
		jMiB = 0
	}
	total := estimateBlocks(wantBlocks, jMiB*miB/blockSize)

	f, err := os.CreateTemp(dir, tempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	var sb superblock
	passes := 0
	for {
		passes++
		// Start each pass from an all-hole file: nothing of an earlier
		// pass's metadata stays behind.
		if err := f.Truncate(0); err != nil {
			return err
		}
		if err := f.Truncate(total * blockSize); err != nil {
			return fmt.Errorf("size the image to %d bytes: %w", total*blockSize, err)
		}
		if err := mkfs(ctx, tool, tmp, want, jMiB); err != nil {
			return err
		}
		if sb, err = readSuperblock(f); err != nil {
			return fmt.Errorf("read back the new filesystem: %w", err)
		}
		if sb.blockSize != blockSize {
			return fmt.Errorf("mkfs made %d-byte blocks, want %d", sb.blockSize, blockSize)
		}
		avail := sb.availBlocks()
		if avail >= wantBlocks {
			break
		}
		if passes == maxPasses {
			return fmt.Errorf("%d blocks free after %d mkfs passes, want %d: report this as a bug with the e2fsprogs version (mkfs.ext4 -V)",
				avail, passes, wantBlocks)
		}
		short := wantBlocks - avail
		total += short + short/32 + 8
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync the image: %w", err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, img); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	klog.FromContext(ctx).V(4).Info("Created clone filesystem", "diskImage", img, "sizeMiB", want,
		"imageBytes", total*blockSize, "availBytes", sb.availBlocks()*blockSize, "journalMiB", jMiB,
		"passes", passes, "duration", time.Since(start))
	return nil
}

// mkfs runs mkfs.ext4 on path. The options make the result independent of
// mke2fs.conf: 4 KiB blocks, 256-byte inodes, one inode per 16 KiB, no root
// reserve (-m 0: the clone's writer is its only user), lazily initialised
// inode tables and journal (so the sparse file stays sparse), no discard (a
// new sparse file is all holes already), and a root directory owned by 0:0
// mode 0755. A jMiB of 0 makes a filesystem without a journal.
func mkfs(ctx context.Context, tool, path string, want, jMiB int64) error {
	feats, journal := features, []string{"-J", "size=" + strconv.FormatInt(jMiB, 10)}
	if jMiB == 0 {
		feats, journal = strings.Replace(features, ",has_journal", "", 1), nil
	}
	args := []string{
		"-q", "-F", "-t", "ext4",
		"-b", strconv.Itoa(blockSize), "-I", "256", "-i", "16384", "-m", "0",
		"-O", feats,
	}
	args = append(args, journal...)
	args = append(args,
		"-L", label(want),
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
		path,
	)
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", tool, ctx.Err())
		}
		return fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// label is the ext4 label recording the requested size.
func label(want int64) string { return labelPrefix + strconv.FormatInt(want, 10) + labelSuffix }

// removeTemps removes images left half-made by an interrupted Create.
func removeTemps(dir string) error {
	leftovers, err := filepath.Glob(filepath.Join(dir, tempPrefix+"*"))
	if err != nil {
		return err
	}
	for _, p := range leftovers {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// readImageMiB returns the size in MiB that the image at img was made for,
// from its label. A missing image wraps fs.ErrNotExist.
func readImageMiB(img string) (int64, error) {
	f, err := os.Open(img)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sb, err := readSuperblock(f)
	if err != nil {
		return 0, err
	}
	return sb.sizeMiB()
}

// sizeMiB is the size in MiB the superblock's label records.
func (sb superblock) sizeMiB() (int64, error) {
	v, ok := strings.CutPrefix(sb.label, labelPrefix)
	if v, ok2 := strings.CutSuffix(v, labelSuffix); ok && ok2 {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			return n, nil
		}
	}
	return 0, fmt.Errorf("the ext4 filesystem in it is not a Strata clone image (label %q, want %s<MiB>%s): move it away",
		sb.label, labelPrefix, labelSuffix)
}

// superblock holds the fields of an ext4 superblock that sizing needs.
type superblock struct {
	blockSize              int64
	blocks, reserved, free int64
	label                  string
}

// availBlocks is statfs's f_bavail of a fresh mount: free blocks less the
// root reserve (-m) and the kernel's own reserve.
func (sb superblock) availBlocks() int64 {
	return sb.free - sb.reserved - min(sb.blocks/50, kernelReserveMax)
}

// readSuperblock parses the primary ext4 superblock (offset 1024; layout in
// the kernel's fs/ext4/ext4.h, struct ext4_super_block).
func readSuperblock(r io.ReaderAt) (superblock, error) {
	var b [1024]byte
	if _, err := r.ReadAt(b[:], 1024); err != nil {
		if errors.Is(err, io.EOF) {
			return superblock{}, errors.New("too short for an ext4 filesystem: an incomplete image")
		}
		return superblock{}, err
	}
	le := binary.LittleEndian
	if magic := le.Uint16(b[0x38:]); magic != 0xEF53 {
		return superblock{}, fmt.Errorf("no ext4 filesystem (magic %#x)", magic)
	}
	lohi := func(lo, hi int) int64 { return int64(le.Uint32(b[lo:])) }
	if le.Uint32(b[0x60:])&0x80 != 0 { // INCOMPAT_64BIT: the _hi halves are valid
		lohi = func(lo, hi int) int64 { return int64(le.Uint32(b[lo:])) | int64(le.Uint32(b[hi:]))<<32 }
	}
	return superblock{
		blockSize: 1024 << min(le.Uint32(b[0x18:]), 16),
		blocks:    lohi(0x04, 0x150),
		reserved:  lohi(0x08, 0x154),
		free:      lohi(0x0C, 0x158),
		label:     string(bytes.TrimRight(b[0x78:0x88], "\x00")),
	}, nil
}

// ImageBytes is the most of the node's disk that the image of a clone of
// size bytes can take once its writes fill it: the size of the sparse file
// Create makes (see the package comment), plus the growth margin of one
// format pass. It is what a node must have free for a new clone of size
// (package capacity).
func ImageBytes(size int64) int64 {
	if size <= 0 {
		return 0
	}
	want := (size + miB - 1) / miB
	total := estimateBlocks(want*miB/blockSize, journalMiB(want)*miB/blockSize)
	// format grows a short image by its shortfall, which is a small part
	// of the estimate's overhead: a 64th of it is more than any measured.
	return (total + total/64 + 16) * blockSize
}
