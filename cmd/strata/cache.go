package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
)

func init() {
	register(&command{name: "ls", summary: "List the cached images and layers, and the volumes (pods) that hold them", flags: lsFlags})
	register(&command{name: "du", summary: "Show the cache's disk use and what sharing layers saves", flags: duFlags})
	register(&command{name: "prune", summary: "Remove the cached layers that no volume uses", flags: pruneFlags})
	register(&command{name: "version", summary: "Print the version of strata", flags: versionFlags})
}

// noArgs rejects positional arguments for commands that take none.
func noArgs(name string, args []string) error {
	if len(args) > 0 {
		return usagef(commands[name], "%s takes no arguments, got %q", name, strings.Join(args, " "))
	}
	return nil
}

// The JSON output of `strata ls --json`. Its field names are part of the
// CLI's contract with scripts, independent of layercache's types.
type (
	lsJSON struct {
		Images  []imageJSON  `json:"images"`
		Layers  []layerJSON  `json:"layers"`
		Volumes []volumeJSON `json:"volumes"` // the CSI plugin's publishes on this root
	}
	imageJSON struct {
		Ref      string    `json:"ref"`
		Digest   string    `json:"digest"`
		Resolved time.Time `json:"resolved"`
		Layers   []string  `json:"layers"` // diffIDs, bottom first
		Size     int64     `json:"size"`
		Complete bool      `json:"complete"`
		// An artifact's type, and its files (each a layer of its own,
		// mounted through the tree of them, the last of Layers).
		ArtifactType string     `json:"artifactType,omitempty"`
		Files        []fileJSON `json:"files,omitempty"`
	}
	fileJSON struct {
		Path   string `json:"path"`
		DiffID string `json:"diffID"`
		Size   int64  `json:"size"`
	}
	layerJSON struct {
		DiffID         string    `json:"diffID"`
		Digest         string    `json:"digest"`
		MediaType      string    `json:"mediaType"`
		CompressedSize int64     `json:"compressedSize"`
		Size           int64     `json:"size"`
		Files          int64     `json:"files"`
		Created        time.Time `json:"created"`
		LastUsed       time.Time `json:"lastUsed"`
		Images         []string  `json:"images"` // cached references that use the layer
		Owners         []string  `json:"owners"` // who holds the layer: volume keys, prepull:REF
		// Volumes are the publishes among the owners, with their pods.
		Volumes []volumeJSON `json:"volumes"`
	}
	volumeJSON struct {
		Key          string    `json:"key"` // volumes/<key>, the owner of its layers
		VolumeID     string    `json:"volumeID"`
		TargetPath   string    `json:"targetPath"`
		Image        string    `json:"image"`
		Digest       string    `json:"digest"`
		ReadOnly     bool      `json:"readOnly"`
		Published    time.Time `json:"published"`
		PodNamespace string    `json:"podNamespace,omitempty"`
		PodName      string    `json:"podName,omitempty"`
		PodUID       string    `json:"podUID,omitempty"`
	}
)

func toVolumeJSON(v state.Volume) volumeJSON {
	return volumeJSON{Key: v.Key, VolumeID: v.VolumeID, TargetPath: v.TargetPath, Image: v.Image,
		Digest: v.Digest.String(), ReadOnly: v.ReadOnly, Published: v.Published,
		PodNamespace: v.PodNamespace, PodName: v.PodName, PodUID: v.PodUID}
}

// layersAndVolumes lists the cached layers and the plugin's publishes on
// root.
func layersAndVolumes(s *layercache.Store, root string) ([]layercache.LayerInfo, []state.Volume, error) {
	layers, err := s.Layers()
	if err != nil {
		return nil, nil, fmt.Errorf("list layers: %w", err)
	}
	vols, err := state.List(root)
	if err != nil {
		return nil, nil, fmt.Errorf("list volumes: %w", err)
	}
	return layers, vols, nil
}

func lsFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	asJSON := fs.Bool("json", false, "print JSON instead of tables")
	return func(ctx context.Context, e *env, args []string) error {
		if err := noArgs("ls", args); err != nil {
			return err
		}
		s, err := e.open()
		if err != nil {
			return err
		}
		images, err := s.Images()
		if err != nil {
			return fmt.Errorf("list images: %w", err)
		}
		layers, vols, err := layersAndVolumes(s, e.root)
		if err != nil {
			return err
		}
		byKey := map[string]state.Volume{}
		out := lsJSON{Images: []imageJSON{}, Layers: []layerJSON{}, Volumes: []volumeJSON{}}
		for _, v := range vols {
			byKey[v.Key] = v
			out.Volumes = append(out.Volumes, toVolumeJSON(v))
		}
		users := map[v1.Hash][]string{}
		for _, im := range images {
			j := imageJSON{Ref: im.Ref, Digest: im.Digest.String(), Resolved: im.Resolved,
				Layers: []string{}, Size: im.Size, Complete: im.Complete, ArtifactType: im.ArtifactType}
			seen := map[v1.Hash]bool{}
			ids := slices.Clone(im.Layers)
			for _, d := range im.Layers {
				j.Layers = append(j.Layers, d.String())
			}
			for _, f := range im.Files {
				j.Files = append(j.Files, fileJSON{Path: f.Path, DiffID: f.DiffID.String(), Size: f.Size})
				ids = append(ids, f.DiffID)
			}
			for _, d := range ids {
				if !seen[d] {
					seen[d] = true
					users[d] = append(users[d], im.Ref)
				}
			}
			out.Images = append(out.Images, j)
		}
		for _, l := range layers {
			j := layerJSON{
				DiffID: l.DiffID.String(), Digest: l.Digest.String(), MediaType: string(l.MediaType),
				CompressedSize: l.CompressedSize, Size: l.Size, Files: l.Files, Created: l.Created,
				LastUsed: l.LastUsed, Images: nonNil(users[l.DiffID]), Owners: nonNil(l.Owners),
				Volumes: []volumeJSON{},
			}
			for _, o := range l.Owners {
				if v, ok := byKey[o]; ok {
					j.Volumes = append(j.Volumes, toVolumeJSON(v))
				}
			}
			out.Layers = append(out.Layers, j)
		}
		if *asJSON {
			enc := json.NewEncoder(e.stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(out)
		}
		return printLs(e.stdout, images, layers, users, vols)
	}
}

// maxUsers is how many holders of a layer the table names, maxFiles how
// many files of an artifact; --json has all.
const (
	maxUsers = 3
	maxFiles = 20
)

// holder names who holds a layer: the pod and volume id of a publish
// ("shop/web-0 (vol-1)"), the volume id alone when kubelet did not pass the
// pod, or the owner as recorded (a prepull, or a volume whose record is
// gone).
func holder(owner string, vols map[string]state.Volume) string {
	v, ok := vols[owner]
	switch {
	case !ok:
		return owner
	case v.Pod() == "":
		return "volume " + v.VolumeID
	}
	return v.Pod() + " (" + v.VolumeID + ")"
}

// usedBy lists the holders of a layer, the first maxUsers of them.
func usedBy(owners []string, vols map[string]state.Volume) string {
	if len(owners) == 0 {
		return "-"
	}
	names := make([]string, 0, len(owners))
	for _, o := range owners {
		names = append(names, holder(o, vols))
	}
	sort.Strings(names)
	if len(names) > maxUsers {
		return strings.Join(names[:maxUsers], ", ") + fmt.Sprintf(" and %d more", len(names)-maxUsers)
	}
	return strings.Join(names, ", ")
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func printLs(w io.Writer, images []layercache.ImageInfo, layers []layercache.LayerInfo, users map[v1.Hash][]string, vols []state.Volume) error {
	byKey := map[string]state.Volume{}
	for _, v := range vols {
		byKey[v.Key] = v
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tDIGEST\tLAYERS\tSIZE\tCOMPLETE")
	for _, im := range images {
		complete := "yes"
		if !im.Complete {
			complete = "no"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", im.Ref, shortDigest(im.Digest), len(im.Layers), humanBytes(im.Size), complete)
	}
	for _, im := range images {
		if im.ArtifactType == "" {
			continue
		}
		fmt.Fprintf(tw, "\nARTIFACT %s (%s): %d files (mounted as one tree), %d tar layers\n", im.Ref, im.ArtifactType, len(im.Files), len(im.Layers)-min(1, len(im.Files)))
		for i, f := range im.Files {
			if i == maxFiles {
				fmt.Fprintf(tw, "  and %d more files (--json lists them all)\n", len(im.Files)-maxFiles)
				break
			}
			fmt.Fprintf(tw, "  %s\t%s\n", f.Path, humanBytes(f.Size))
		}
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "LAYER\tSIZE\tFILES\tIMAGES\tOWNERS\tLAST USE\tUSED BY")
	now := time.Now()
	for _, l := range layers {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\n", shortDigest(l.DiffID), humanBytes(l.Size), l.Files,
			len(users[l.DiffID]), len(l.Owners), ago(l.LastUsed, now), usedBy(l.Owners, byKey))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "VOLUME\tPOD\tIMAGE\tDIGEST\tLAYERS\tPUBLISHED")
	for _, v := range vols {
		pod := v.Pod()
		if pod == "" {
			pod = "-"
		}
		// A stack shows its bottom image and how many are above it.
		image := v.Image
		if n := len(v.Images()) - 1; n > 0 {
			image += fmt.Sprintf(" (+%d stacked)", n)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", v.VolumeID, pod, image, shortDigest(v.Digest), len(v.Layers), ago(v.Published, now))
	}
	return tw.Flush()
}

func duFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	exact := fs.Bool("bytes", false, "print exact byte counts instead of human units")
	return func(ctx context.Context, e *env, args []string) error {
		if err := noArgs("du", args); err != nil {
			return err
		}
		s, err := e.open()
		if err != nil {
			return err
		}
		u, err := s.Usage()
		if err != nil {
			return fmt.Errorf("compute disk use: %w", err)
		}
		layers, vols, err := layersAndVolumes(s, e.root)
		if err != nil {
			return err
		}
		v := volumeSharing(layers, vols)
		size := humanBytes
		if *exact {
			size = func(n int64) string { return strconv.FormatInt(n, 10) }
		}
		rows := []struct {
			name, value, note string
		}{
			{"images", strconv.Itoa(u.Images), "cached images, by digest (a tag and its digest are one)"},
			{"layers", strconv.Itoa(u.Layers), "cached layers"},
			{"total", size(u.Bytes), "content of the cached layers"},
			{"in use", size(u.InUseBytes), "held by volumes; prune keeps these"},
			{"shared", size(u.SharedBytes), "used by more than one cached image"},
			{"unique", size(u.UniqueBytes), "used by exactly one cached image"},
			{"saved", size(u.SavedBytes), "that one copy per image would cost on top"},
			{"volumes", strconv.Itoa(v.volumes), "published on this node"},
			{"as copies", size(v.asCopies), "what the volumes' images would take, one copy per volume"},
			{"held", size(v.held), "what the cache holds for them: each layer once"},
		}
		nameWidth, width := 0, 0
		for _, r := range rows {
			nameWidth = max(nameWidth, len(r.name))
			width = max(width, len(r.value))
		}
		for _, r := range rows {
			fmt.Fprintf(e.stdout, "%-*s %*s  %s\n", nameWidth, r.name, width, r.value, r.note)
		}
		return nil
	}
}

// sharing is how the volumes published on the node share the cache.
type sharing struct {
	volumes int
	// asCopies is what the volumes' layers would take with a copy for each
	// volume; held what the cache holds of them, each layer once.
	asCopies, held int64
}

// volumeSharing adds up the content of each volume's layers, and of the
// distinct layers of all of them. An artifact's tree layer stands for the
// raw files it links (its parts), which it holds on the volumes' behalf:
// their content is its.
func volumeSharing(layers []layercache.LayerInfo, vols []state.Volume) sharing {
	content := map[v1.Hash]int64{}
	for _, l := range layers {
		content[l.DiffID] = l.Size
	}
	for _, l := range layers {
		for _, p := range l.Parts {
			content[l.DiffID] += content[p]
		}
	}
	sh := sharing{volumes: len(vols)}
	held := map[v1.Hash]bool{}
	for _, v := range vols {
		for _, d := range v.Layers {
			sh.asCopies += content[d]
			if !held[d] {
				held[d] = true
				sh.held += content[d]
			}
		}
	}
	return sh
}

func pruneFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	return func(ctx context.Context, e *env, args []string) error {
		if err := noArgs("prune", args); err != nil {
			return err
		}
		s, err := e.open()
		if err != nil {
			return err
		}
		// Sizes for the report; a layer pulled between this and the prune
		// is reported without one.
		sizes := map[v1.Hash]int64{}
		if layers, err := s.Layers(); err == nil {
			for _, l := range layers {
				sizes[l.DiffID] = l.Size
			}
		}
		res, err := s.Prune(ctx)
		for _, d := range res.Layers {
			if sz, ok := sizes[d]; ok {
				fmt.Fprintf(e.stdout, "removed layer %s %s\n", d, humanBytes(sz))
			} else {
				fmt.Fprintf(e.stdout, "removed layer %s\n", d)
			}
		}
		if err != nil {
			return fmt.Errorf("prune: %w", err)
		}
		fmt.Fprintf(e.stdout, "freed %s (%d layers)\n", humanBytes(res.Bytes), len(res.Layers))
		return nil
	}
}

func versionFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	return func(ctx context.Context, e *env, args []string) error {
		if err := noArgs("version", args); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "strata %s\n", version)
		return nil
	}
}
