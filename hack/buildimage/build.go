package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The binaries the image carries, by file name in --bin; the first one is the
// entrypoint.
var binaries = []string{"strata-csi", "strata"}

const (
	binDir       = "usr/local/bin"
	defaultSrc   = "https://github.com/strata-csi/strata"
	imageTitle   = "strata-csi"
	imageDesc    = "Strata CSI driver: OCI images as copy-on-write volumes. Node and controller plugin (strata-csi) and operator CLI (strata)."
	imageLicense = "Apache-2.0"

	// annotationImageName is the annotation containerd's importer reads
	// before org.opencontainers.image.ref.name (images.AnnotationImageName).
	annotationImageName = "io.containerd.image.name"
)

// Options are the inputs of an image build. The same options and the same
// input files always give the same image digest and the same archive bytes.
type Options struct {
	BinDir   string    // directory holding strata-csi and strata
	CABundle string    // the host's CA bundle, copied to /etc/ssl/certs/ca-certificates.crt
	Tag      string    // e.g. localhost/strata/strata-csi:v0.1.0
	Out      string    // the OCI archive to write; empty: none
	Version  string    // org.opencontainers.image.version
	Revision string    // org.opencontainers.image.revision
	Source   string    // org.opencontainers.image.source
	Platform string    // os/arch[/variant], e.g. linux/amd64
	Created  time.Time // image creation time and the mtime of every file
	// Mke2fs is the build host's mke2fs, copied to /sbin/mke2fs with the
	// shared libraries and dynamic loader it needs (as ldd lists them), and
	// linked as /sbin/mkfs.ext4: persistent clones format their filesystem
	// images with it. Empty: the image has no mke2fs.
	Mke2fs string
	// Mke2fsConf is copied to /etc/mke2fs.conf with Mke2fs; empty means
	// /etc/mke2fs.conf.
	Mke2fsConf string
}

// Result describes a built image.
type Result struct {
	Image       v1.Image
	Tag         name.Tag
	Digest      v1.Hash // manifest digest
	Size        int64   // manifest + config + layers, as a registry stores them
	ArchiveSize int64   // bytes of the archive at Options.Out
}

// Build assembles the image from the options and, if o.Out is set, writes it
// as an OCI image archive that also carries a docker-compatible manifest.json.
func Build(o Options) (*Result, error) {
	if o.Version == "" {
		return nil, errors.New("no version given")
	}
	tag, err := name.NewTag(o.Tag, name.StrictValidation)
	if err != nil {
		return nil, fmt.Errorf("tag %q: %w", o.Tag, err)
	}
	plat, err := v1.ParsePlatform(o.Platform)
	if err != nil {
		return nil, fmt.Errorf("platform %q: %w", o.Platform, err)
	}
	if plat.OS != "linux" {
		return nil, fmt.Errorf("platform %q: only linux images can be built", o.Platform)
	}
	if o.Source == "" {
		o.Source = defaultSrc
	}
	created := o.Created.UTC().Truncate(time.Second)

	files, err := rootfs(o, plat)
	if err != nil {
		return nil, err
	}
	layerTar, err := tarFiles(files, created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, err
	}

	labels := map[string]string{
		"org.opencontainers.image.version":     o.Version,
		"org.opencontainers.image.revision":    o.Revision,
		"org.opencontainers.image.source":      o.Source,
		"org.opencontainers.image.title":       imageTitle,
		"org.opencontainers.image.description": imageDesc,
		"org.opencontainers.image.licenses":    imageLicense,
		"org.opencontainers.image.created":     created.Format(time.RFC3339),
	}
	if o.Revision == "" {
		delete(labels, "org.opencontainers.image.revision")
	}
	cfg := &v1.ConfigFile{
		Architecture: plat.Architecture,
		OS:           plat.OS,
		Variant:      plat.Variant,
		Created:      v1.Time{Time: created},
		Config: v1.Config{
			Entrypoint: []string{"/" + binDir + "/" + binaries[0]},
			Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			WorkingDir: "/",
			Labels:     labels,
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	contents := append([]string(nil), binaries...)
	if o.Mke2fs != "" {
		contents = append(contents, "mke2fs")
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "hack/buildimage: base files and " + strings.Join(contents, ", "),
		},
	})
	if err != nil {
		return nil, err
	}
	// Annotate the manifest too, so registries that show annotations show these.
	img = mutate.Annotations(img, map[string]string{
		"org.opencontainers.image.version": o.Version,
		"org.opencontainers.image.source":  o.Source,
		"org.opencontainers.image.created": created.Format(time.RFC3339),
	}).(v1.Image)

	res := &Result{Image: img, Tag: tag}
	if res.Digest, err = img.Digest(); err != nil {
		return nil, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	raw, err := img.RawManifest()
	if err != nil {
		return nil, err
	}
	res.Size = int64(len(raw)) + m.Config.Size
	for _, l := range m.Layers {
		res.Size += l.Size
	}
	if o.Out != "" {
		if res.ArchiveSize, err = writeArchive(o.Out, img, tag, plat, created); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// file is one entry of a generated tar.
type file struct {
	name string // relative, no leading slash; directories end in '/'
	mode int64
	data []byte
	link string // symlink target; set for symlinks only
}

// rootfs returns the image's files: a minimal base, the binaries and, if
// asked for, mke2fs.
func rootfs(o Options, plat *v1.Platform) ([]file, error) {
	ca, err := os.ReadFile(o.CABundle)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	if !bytes.Contains(ca, []byte("-----BEGIN CERTIFICATE-----")) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", o.CABundle)
	}
	files := []file{
		{name: "etc/", mode: 0o755},
		{name: "etc/passwd", mode: 0o644, data: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\n" +
				"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")},
		{name: "etc/group", mode: 0o644, data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{name: "etc/nsswitch.conf", mode: 0o644, data: []byte(
			"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nservices: files\nprotocols: files\n")},
		{name: "etc/ssl/", mode: 0o755},
		{name: "etc/ssl/certs/", mode: 0o755},
		{name: "etc/ssl/certs/ca-certificates.crt", mode: 0o644, data: ca},
		{name: "root/", mode: 0o700},
		{name: "tmp/", mode: 0o1777},
		{name: "usr/", mode: 0o755},
		{name: "usr/local/", mode: 0o755},
		{name: binDir + "/", mode: 0o755},
	}
	for _, b := range binaries {
		p := filepath.Join(o.BinDir, b)
		if err := checkStatic(p, plat); err != nil {
			return nil, err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		files = append(files, file{name: binDir + "/" + b, mode: 0o755, data: data})
	}
	if o.Mke2fs != "" {
		mk, err := mke2fsFiles(o.Mke2fs, o.Mke2fsConf, plat)
		if err != nil {
			return nil, err
		}
		files = withParents(append(files, mk...))
	}
	return files, nil
}

var elfMachine = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"arm":     elf.EM_ARM,
	"386":     elf.EM_386,
	"ppc64le": elf.EM_PPC64,
	"s390x":   elf.EM_S390,
	"riscv64": elf.EM_RISCV,
}

// checkStatic returns an error unless path is a statically linked ELF
// executable for the platform: the image has no dynamic loader and no libc.
func checkStatic(path string, plat *v1.Platform) error {
	f, err := elf.Open(path)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return fmt.Errorf("%s is not an ELF executable: %w", path, err)
		}
		return err
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("%s is not an executable (ELF type %v)", path, f.Type)
	}
	if want, ok := elfMachine[plat.Architecture]; !ok {
		return fmt.Errorf("platform %s: unknown architecture %q", plat, plat.Architecture)
	} else if f.Machine != want {
		return fmt.Errorf("%s is built for %v, not for %s", path, f.Machine, plat)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			interp, _ := io.ReadAll(io.LimitReader(p.Open(), 4096))
			return fmt.Errorf("%s is dynamically linked (interpreter %s): the image has no libc or dynamic loader; build it with CGO_ENABLED=0 (make build)",
				path, strings.TrimRight(string(interp), "\x00"))
		}
	}
	if libs, err := f.ImportedLibraries(); err == nil && len(libs) > 0 {
		return fmt.Errorf("%s needs shared libraries %v: build it with CGO_ENABLED=0 (make build)", path, libs)
	}
	return nil
}

// tarFiles writes files as a tar, sorted by name, owned by root, every mtime
// set to mtime.
func tarFiles(files []file, mtime time.Time) ([]byte, error) {
	sorted := append([]file(nil), files...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].name < sorted[j].name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i, f := range sorted {
		if i > 0 && sorted[i-1].name == f.name {
			return nil, fmt.Errorf("duplicate tar entry %s", f.name)
		}
		hdr := &tar.Header{
			Name:    f.name,
			Mode:    f.mode,
			ModTime: mtime,
			Uname:   "root",
			Gname:   "root",
			Format:  tar.FormatPAX,
		}
		if strings.HasSuffix(f.name, "/") {
			hdr.Typeflag = tar.TypeDir
		} else if f.link != "" {
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, f.link
		} else {
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// fullName is tag as containerd names images: registry/repository:tag, with
// Docker Hub as docker.io.
func fullName(tag name.Tag) string {
	reg := tag.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return reg + "/" + tag.RepositoryStr() + ":" + tag.TagStr()
}

// dockerManifest is one entry of a docker archive's manifest.json.
type dockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// writeArchive writes img as a tarred OCI image layout whose index.json names
// the image by tag, plus a docker-style manifest.json pointing at the same
// blobs (the layout docker save writes since Docker 25). containerd's
// importer reads index.json when oci-layout is present, docker load and
// go-containerregistry's tarball package read manifest.json.
func writeArchive(out string, img v1.Image, tag name.Tag, plat *v1.Platform, mtime time.Time) (int64, error) {
	rawManifest, err := img.RawManifest()
	if err != nil {
		return 0, err
	}
	rawConfig, err := img.RawConfigFile()
	if err != nil {
		return 0, err
	}
	m, err := img.Manifest()
	if err != nil {
		return 0, err
	}
	digest, err := img.Digest()
	if err != nil {
		return 0, err
	}
	mt, err := img.MediaType()
	if err != nil {
		return 0, err
	}
	blobPath := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType: mt,
			Size:      int64(len(rawManifest)),
			Digest:    digest,
			Platform:  plat,
			Annotations: map[string]string{
				annotationImageName:                 fullName(tag),
				"org.opencontainers.image.ref.name": fullName(tag),
			},
		}},
	}
	rawIndex, err := json.Marshal(index)
	if err != nil {
		return 0, err
	}
	dm := []dockerManifest{{Config: blobPath(m.Config.Digest), RepoTags: []string{tag.String()}}}
	for _, l := range m.Layers {
		dm[0].Layers = append(dm[0].Layers, blobPath(l.Digest))
	}
	rawDocker, err := json.Marshal(dm)
	if err != nil {
		return 0, err
	}

	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return 0, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".buildimage-*.tar")
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	defer tmp.Close()
	tw := tar.NewWriter(tmp)
	put := func(name string, size int64, r io.Reader) error {
		hdr := &tar.Header{Name: name, Mode: 0o644, ModTime: mtime, Size: size, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if r == nil {
			hdr.Typeflag, hdr.Mode = tar.TypeDir, 0o755
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if r != nil {
			if n, err := io.Copy(tw, r); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			} else if n != size {
				return fmt.Errorf("%s: wrote %d bytes, want %d", name, n, size)
			}
		}
		return nil
	}
	putBytes := func(name string, b []byte) error { return put(name, int64(len(b)), bytes.NewReader(b)) }

	// Metadata first, so streaming importers see oci-layout before the blobs.
	if err := putBytes("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return 0, err
	}
	if err := putBytes("index.json", rawIndex); err != nil {
		return 0, err
	}
	if err := putBytes("manifest.json", rawDocker); err != nil {
		return 0, err
	}
	if err := put("blobs/", 0, nil); err != nil {
		return 0, err
	}
	if err := put("blobs/sha256/", 0, nil); err != nil {
		return 0, err
	}
	type blob struct {
		path  string
		write func() error
	}
	blobs := []blob{
		{blobPath(digest), func() error { return putBytes(blobPath(digest), rawManifest) }},
		{blobPath(m.Config.Digest), func() error { return putBytes(blobPath(m.Config.Digest), rawConfig) }},
	}
	layers, err := img.Layers()
	if err != nil {
		return 0, err
	}
	for i, l := range layers {
		d := m.Layers[i]
		blobs = append(blobs, blob{blobPath(d.Digest), func() error {
			rc, err := l.Compressed()
			if err != nil {
				return err
			}
			defer rc.Close()
			return put(blobPath(d.Digest), d.Size, rc)
		}})
	}
	sort.Slice(blobs, func(i, j int) bool { return blobs[i].path < blobs[j].path })
	for i, b := range blobs {
		if i > 0 && blobs[i-1].path == b.path {
			continue // the same blob twice (e.g. two empty layers)
		}
		if err := b.write(); err != nil {
			return 0, err
		}
	}
	if err := tw.Close(); err != nil {
		return 0, err
	}
	if err := tmp.Sync(); err != nil {
		return 0, err
	}
	fi, err := tmp.Stat()
	if err != nil {
		return 0, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return 0, err
	}
	if err := tmp.Close(); err != nil {
		return 0, err
	}
	return fi.Size(), os.Rename(tmp.Name(), out)
}
