package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/strata-csi/strata/driver/commits/source"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache/commit"
)

func init() {
	register(&command{
		name:    "diff",
		args:    "VOLUME|NAMESPACE/POD",
		summary: "Show what a volume's pod added, changed and deleted in its image, as docker diff",
		help:    diffHelp,
		flags:   diffFlags,
	})
}

const diffHelp = `Output:
  One line per path, sorted by path, under a header:
    KIND  TYPE          SIZE  PATH
    C     dir              -  /data
    A     file        1.2 MB  /data/new.bin
    D     file             -  /data/old.txt
  KIND is A (added), C (changed: in the image, and written to or replaced)
  or D (deleted). The parent directories of a change show as C (or A).
  A deleted directory is one line, not its content. TYPE is file, dir,
  symlink, fifo, socket, chardev or blockdev (for D: what was deleted).
  SIZE is the length of a file or of a symlink's target in the volume's
  writable layer ('-' for others). A last line sums up:
    N added, N changed, N deleted, SIZE written
  SIZE written counts each file once (hardlinks), regular files only.
  Paths are those of the whole image, also when the volume has a subPath.
  The volume's writable layer is read in place, while the pod may write:
  nothing is copied, and only directories are opened (sizes come from
  stat), so a FIFO cannot block diff. A read-only volume has no writes.
  Rows are printed as they are found: after an error, the output is
  incomplete (the exit code says so).
  --json prints {"volumeID", "pod", "targetPath", "readOnly",
  "changes": [{"path", "kind", "type", "size"}], "summary": {"added",
  "changed", "deleted", "bytes"}} with sizes in bytes.
`

// The JSON output of `strata diff --json`. Its field names are part of the
// CLI's contract with scripts. It is written as the changes are found (see
// jsonDiff), in this order.
type (
	diffJSON struct {
		diffHeadJSON
		Changes []changeJSON    `json:"changes"` // sorted by path
		Summary diffSummaryJSON `json:"summary"`
	}
	diffHeadJSON struct {
		VolumeID   string `json:"volumeID"`
		Pod        string `json:"pod,omitempty"` // NAMESPACE/NAME, when kubelet passed it
		TargetPath string `json:"targetPath"`
		ReadOnly   bool   `json:"readOnly"`
	}
	changeJSON struct {
		Path string `json:"path"`
		Kind string `json:"kind"` // A, C or D
		Type string `json:"type"` // file, dir, symlink, fifo, socket, chardev, blockdev
		Size int64  `json:"size"` // bytes of a file or a symlink's target in the upper (A, C); else 0
	}
	diffSummaryJSON struct {
		Added   int   `json:"added"`
		Changed int   `json:"changed"`
		Deleted int   `json:"deleted"`
		Bytes   int64 `json:"bytes"` // of the regular files written, each inode once
	}
)

func diffFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	targetPath := fs.String("target-path", "", "the publish's target path, when VOLUME is published more than once on this node")
	asJSON := fs.Bool("json", false, "print JSON instead of the table")
	return func(ctx context.Context, e *env, args []string) error {
		cmd := commands["diff"]
		if len(args) != 1 {
			return usagef(cmd, "diff needs a volume id or a pod as NAMESPACE/NAME, got %d arguments", len(args))
		}
		v, err := findVolume(cmd, e.root, args[0], *targetPath, false)
		if err != nil {
			return err
		}
		var out changePrinter = &tableDiff{w: e.stdout}
		if *asJSON {
			head := diffHeadJSON{VolumeID: v.VolumeID, Pod: v.Pod(), TargetPath: v.TargetPath, ReadOnly: v.ReadOnly}
			if out, err = newJSONDiff(e.stdout, head); err != nil {
				return err
			}
		}
		var stats commit.ChangeStats
		if v.ReadOnly {
			fmt.Fprintf(e.stderr, "strata: volume %q at %s is read-only: it has no writes, nothing changed\n", v.VolumeID, v.TargetPath)
		} else if stats, err = volumeChanges(ctx, e, v, out.change); err != nil {
			return err
		}
		return out.end(diffSummaryJSON{Added: stats.Added, Changed: stats.Changed, Deleted: stats.Deleted, Bytes: stats.Bytes})
	}
}

// volumeChanges emits the changes in the upper of the publish v over its
// cached layers.
func volumeChanges(ctx context.Context, e *env, v *state.Volume, emit func(commit.Change) error) (commit.ChangeStats, error) {
	src, err := source.OfPublish(e.root, v)
	if err != nil {
		return commit.ChangeStats{}, err
	}
	if _, err := os.Lstat(src.Upper); errors.Is(err, fs.ErrNotExist) {
		if v.Clone {
			return commit.ChangeStats{}, fmt.Errorf("volume %q is a persistent clone whose filesystem is not mounted on this node (no %s): "+
				"its writes are in %s, which is mounted while the clone is staged; run strata diff while a pod that uses it runs on this node",
				v.VolumeID, src.Upper, state.ClonePathsOf(e.root, v.VolumeID).Image)
		}
		return commit.ChangeStats{}, fmt.Errorf("volume %q at %s: its upper directory %s is gone: was it unpublished? (strata ls lists the volumes)",
			v.VolumeID, v.TargetPath, src.Upper)
	}
	s, err := e.open()
	if err != nil {
		return commit.ChangeStats{}, err
	}
	lowers := make([]string, 0, len(v.Layers))
	for _, d := range v.Layers {
		dir, err := s.LayerDir(d)
		if err != nil {
			return commit.ChangeStats{}, fmt.Errorf("volume %q: layer %s: %w", v.VolumeID, d, err)
		}
		if !s.HasLayer(d) {
			return commit.ChangeStats{}, fmt.Errorf("volume %q: its layer %s is not in the cache at %s, though the volume holds it", v.VolumeID, d, e.root)
		}
		lowers = append(lowers, dir)
	}
	stats, err := commit.Changes(ctx, src.Upper, lowers, emit)
	if err != nil {
		return stats, fmt.Errorf("volume %q: %w", v.VolumeID, err)
	}
	return stats, nil
}

// changePrinter writes diff's output as the changes come, so that memory
// does not grow with them.
type changePrinter interface {
	change(commit.Change) error
	end(diffSummaryJSON) error
}

// tableDiff prints the table: a header before the first change (none when
// there is none), a row per change, and the summary line.
type tableDiff struct {
	w    io.Writer
	rows int
}

// diffRow is a row of the table. The widths fit every type and humanBytes
// up to 999.9 TB, so that rows can be printed as they come.
const diffRow = "%-4s  %-8s  %8s  %s\n"

func (t *tableDiff) change(c commit.Change) error {
	if t.rows == 0 {
		fmt.Fprintf(t.w, diffRow, "KIND", "TYPE", "SIZE", "PATH")
	}
	t.rows++
	size := "-"
	if c.Kind != commit.Deleted && (c.Type == "file" || c.Type == "symlink") {
		size = humanBytes(c.Size)
	}
	_, err := fmt.Fprintf(t.w, diffRow, c.Kind, c.Type, size, printablePath(c.Path))
	return err
}

func (t *tableDiff) end(s diffSummaryJSON) error {
	_, err := fmt.Fprintf(t.w, "%d added, %d changed, %d deleted, %s written\n", s.Added, s.Changed, s.Deleted, humanBytes(s.Bytes))
	return err
}

// printablePath quotes a path that holds a control character (a newline
// would forge a row of the table); --json has every path as it is.
func printablePath(p string) string {
	if strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return strconv.Quote(p)
	}
	return p
}

// jsonDiff writes diffJSON, indented as encoding/json would, a change at a
// time.
type jsonDiff struct {
	w    io.Writer
	rows int
}

func newJSONDiff(w io.Writer, head diffHeadJSON) (*jsonDiff, error) {
	b, err := json.MarshalIndent(head, "", "  ")
	if err != nil {
		return nil, err
	}
	// The object without its closing "\n}", then the changes.
	_, err = fmt.Fprintf(w, "%s,\n  \"changes\": [", b[:len(b)-2])
	return &jsonDiff{w: w}, err
}

func (j *jsonDiff) change(c commit.Change) error {
	b, err := json.MarshalIndent(changeJSON{Path: c.Path, Kind: string(c.Kind), Type: c.Type, Size: c.Size}, "    ", "  ")
	if err != nil {
		return err
	}
	sep := ",\n    "
	if j.rows == 0 {
		sep = "\n    "
	}
	j.rows++
	_, err = fmt.Fprintf(j.w, "%s%s", sep, b)
	return err
}

func (j *jsonDiff) end(s diffSummaryJSON) error {
	b, err := json.MarshalIndent(s, "  ", "  ")
	if err != nil {
		return err
	}
	closing := "]"
	if j.rows > 0 {
		closing = "\n  ]"
	}
	_, err = fmt.Fprintf(j.w, "%s,\n  \"summary\": %s\n}\n", closing, b)
	return err
}
