package main

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"
)

const testTag = "localhost/strata/strata-csi:v0.0.1-test"

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// staticBins returns a directory with two small static Go programs named
// strata-csi and strata, built once per test binary.
func staticBins(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "buildimage-bins-")
		if err != nil {
			binErr = err
			return
		}
		binPath = dir
		src := filepath.Join(dir, "src")
		if err := os.MkdirAll(src, 0o755); err != nil {
			binErr = err
			return
		}
		files := map[string]string{
			"go.mod":  "module hello\n\ngo 1.22\n",
			"main.go": "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from the image\") }\n",
		}
		for n, s := range files {
			if err := os.WriteFile(filepath.Join(src, n), []byte(s), 0o644); err != nil {
				binErr = err
				return
			}
		}
		for i, b := range binaries {
			// Different -X values make the two binaries differ. The go
			// command is the one go test puts first on PATH.
			cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.n="+strconv.Itoa(i), "-o", filepath.Join(dir, b), ".")
			cmd.Dir = src
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH, "GOFLAGS=", "GOWORK=off")
			if out, err := cmd.CombinedOutput(); err != nil {
				binErr = errors.New("go build: " + err.Error() + "\n" + string(out))
				return
			}
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(binPath)
	}
	os.Exit(code)
}

func testCABundle(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ca.crt")
	pem := "-----BEGIN CERTIFICATE-----\nMIIBdGVzdA==\n-----END CERTIFICATE-----\n"
	if err := os.WriteFile(p, []byte(pem), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func testOptions(t *testing.T, bins string) Options {
	return Options{
		BinDir:     bins,
		CABundle:   testCABundle(t),
		Tag:        testTag,
		Out:        filepath.Join(t.TempDir(), "strata-image.tar"),
		Version:    "v0.0.1-test",
		Revision:   "0123456789abcdef0123456789abcdef01234567",
		Source:     "https://example.com/strata",
		Platform:   "linux/" + runtime.GOARCH,
		Created:    time.Unix(1700000000, 0),
		Mke2fs:     "/sbin/mke2fs",
		Mke2fsConf: "/etc/mke2fs.conf",
	}
}

// untar extracts an archive of regular files and directories into dir.
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(hdr.Name))
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %s has type %c", hdr.Name, hdr.Typeflag)
		}
	}
}

type entry struct {
	hdr  *tar.Header
	data []byte
}

func layerEntries(t *testing.T, l v1.Layer) (map[string]entry, []string) {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out := map[string]entry{}
	var order []string
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return out, order
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[hdr.Name] = entry{hdr, b}
		order = append(order, hdr.Name)
	}
}

func TestBuild(t *testing.T) {
	bins := staticBins(t)
	o := testOptions(t, bins)
	res, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(o.Out); err != nil || fi.Size() != res.ArchiveSize {
		t.Fatalf("archive: %v, size %d, result says %d", err, fi.Size(), res.ArchiveSize)
	}

	// The OCI layout: index.json names the image by tag.
	dir := t.TempDir()
	untar(t, o.Out, dir)
	lp, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	ii, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := ii.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(im.Manifests))
	}
	desc := im.Manifests[0]
	if got := desc.Annotations["org.opencontainers.image.ref.name"]; got != testTag {
		t.Errorf("ref.name annotation %q, want %q", got, testTag)
	}
	if got := desc.Annotations["io.containerd.image.name"]; got != testTag {
		t.Errorf("io.containerd.image.name annotation %q, want %q", got, testTag)
	}
	if desc.Digest != res.Digest || desc.MediaType != types.OCIManifestSchema1 {
		t.Errorf("index entry %s %s, want %s %s", desc.MediaType, desc.Digest, types.OCIManifestSchema1, res.Digest)
	}
	if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != runtime.GOARCH {
		t.Errorf("index entry platform %v", desc.Platform)
	}
	img, err := lp.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := validateLayout(img); err != nil {
		t.Fatal(err)
	}

	// The config.
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cf.Config.Entrypoint, " "); got != "/usr/local/bin/strata-csi" {
		t.Errorf("entrypoint %q", got)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("config platform %s/%s", cf.OS, cf.Architecture)
	}
	if !cf.Created.Time.Equal(o.Created) {
		t.Errorf("created %v, want %v", cf.Created.Time, o.Created)
	}
	wantLabels := map[string]string{
		"org.opencontainers.image.version":  o.Version,
		"org.opencontainers.image.revision": o.Revision,
		"org.opencontainers.image.source":   o.Source,
		"org.opencontainers.image.title":    "strata-csi",
		"org.opencontainers.image.licenses": "Apache-2.0",
		"org.opencontainers.image.created":  "2023-11-14T22:13:20Z",
	}
	for k, v := range wantLabels {
		if got := cf.Config.Labels[k]; got != v {
			t.Errorf("label %s = %q, want %q", k, got, v)
		}
	}
	if cf.Config.Labels["org.opencontainers.image.description"] == "" {
		t.Error("no description label")
	}

	// The layer.
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	if mt, _ := layers[0].MediaType(); mt != types.OCILayer {
		t.Errorf("layer media type %s", mt)
	}
	files, order := layerEntries(t, layers[0])
	for i := 1; i < len(order); i++ {
		if order[i-1] >= order[i] {
			t.Errorf("layer entries not sorted: %s before %s", order[i-1], order[i])
		}
	}
	ca, _ := os.ReadFile(o.CABundle)
	want := map[string]struct {
		typ  byte
		mode int64
		data []byte
	}{
		"etc/":                              {tar.TypeDir, 0o755, nil},
		"etc/passwd":                        {tar.TypeReg, 0o644, nil},
		"etc/group":                         {tar.TypeReg, 0o644, nil},
		"etc/nsswitch.conf":                 {tar.TypeReg, 0o644, nil},
		"etc/ssl/certs/ca-certificates.crt": {tar.TypeReg, 0o644, ca},
		"tmp/":                              {tar.TypeDir, 0o1777, nil},
		"usr/local/bin/":                    {tar.TypeDir, 0o755, nil},
		"usr/local/bin/strata-csi":          {tar.TypeReg, 0o755, mustRead(t, filepath.Join(bins, "strata-csi"))},
		"usr/local/bin/strata":              {tar.TypeReg, 0o755, mustRead(t, filepath.Join(bins, "strata"))},
		"sbin/":                             {tar.TypeDir, 0o755, nil},
		"sbin/mke2fs":                       {tar.TypeReg, 0o755, mustRead(t, "/sbin/mke2fs")},
		"sbin/mkfs.ext4":                    {tar.TypeSymlink, 0o777, nil},
		"sbin/resize2fs":                    {tar.TypeReg, 0o755, mustRead(t, "/sbin/resize2fs")},
		"sbin/tune2fs":                      {tar.TypeReg, 0o755, mustRead(t, "/sbin/tune2fs")},
		"etc/mke2fs.conf":                   {tar.TypeReg, 0o644, mustRead(t, "/etc/mke2fs.conf")},
	}
	// mke2fs's dynamic loader, at the path its ELF header names.
	interp := elfInterp(t, "/sbin/mke2fs")
	want[strings.TrimPrefix(interp, "/")] = struct {
		typ  byte
		mode int64
		data []byte
	}{tar.TypeReg, 0o755, mustRead(t, interp)}
	for n, w := range want {
		e, ok := files[n]
		if !ok {
			t.Errorf("layer has no %s", n)
			continue
		}
		if e.hdr.Typeflag != w.typ || e.hdr.Mode != w.mode {
			t.Errorf("%s: type %c mode %o, want %c %o", n, e.hdr.Typeflag, e.hdr.Mode, w.typ, w.mode)
		}
		if w.data != nil && !bytes.Equal(e.data, w.data) {
			t.Errorf("%s: content differs from the input file", n)
		}
	}
	for n, e := range files {
		if e.hdr.Uid != 0 || e.hdr.Gid != 0 {
			t.Errorf("%s owned by %d:%d, want 0:0", n, e.hdr.Uid, e.hdr.Gid)
		}
		if !e.hdr.ModTime.Equal(o.Created) {
			t.Errorf("%s mtime %v, want %v", n, e.hdr.ModTime, o.Created)
		}
	}
	if l := files["sbin/mkfs.ext4"].hdr; l == nil || l.Linkname != "mke2fs" {
		t.Errorf("/sbin/mkfs.ext4 is not a symlink to mke2fs: %+v", l)
	}
	var libs []string
	for n := range files {
		if strings.Contains(n, ".so") {
			libs = append(libs, n)
		}
	}
	for _, lib := range []string{"libext2fs.so.2", "libcom_err.so.2", "libc.so.6"} {
		if !strings.Contains(strings.Join(libs, " "), "/"+lib) {
			t.Errorf("no %s in the image; shared objects: %v", lib, libs)
		}
	}
	if !strings.HasPrefix(string(files["etc/passwd"].data), "root:x:0:0:") {
		t.Errorf("/etc/passwd: %q", files["etc/passwd"].data)
	}
	if !strings.HasPrefix(string(files["etc/group"].data), "root:x:0:") {
		t.Errorf("/etc/group: %q", files["etc/group"].data)
	}

	// The docker-style manifest.json in the same archive.
	tag, err := name.NewTag(testTag)
	if err != nil {
		t.Fatal(err)
	}
	dimg, err := tarball.ImageFromPath(o.Out, &tag)
	if err != nil {
		t.Fatalf("docker manifest.json: %v", err)
	}
	if err := validateLayout(dimg); err != nil {
		t.Fatal(err)
	}
	dcfg, _ := dimg.ConfigName()
	ocfg, _ := img.ConfigName()
	if dcfg != ocfg {
		t.Errorf("docker manifest.json config %s, OCI manifest config %s", dcfg, ocfg)
	}
	dl, _ := dimg.Layers()
	d1, _ := dl[0].Digest()
	d2, _ := layers[0].Digest()
	if d1 != d2 {
		t.Errorf("docker manifest.json layer %s, OCI manifest layer %s", d1, d2)
	}
}

// validateLayout reads every blob of img and checks its digest.
func validateLayout(img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		h, n, err := v1.SHA256(rc)
		rc.Close()
		if err != nil {
			return err
		}
		d, _ := l.Digest()
		size, _ := l.Size()
		if h != d || n != size {
			return errors.New("layer blob does not match its digest or size")
		}
	}
	_, err = img.RawConfigFile()
	return err
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReproducible(t *testing.T) {
	bins := staticBins(t)
	o := testOptions(t, bins)
	a, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	first := mustRead(t, o.Out)
	o.Out = filepath.Join(t.TempDir(), "again.tar")
	b, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	if a.Digest != b.Digest {
		t.Errorf("two builds: %s and %s", a.Digest, b.Digest)
	}
	if !bytes.Equal(first, mustRead(t, o.Out)) {
		t.Error("two builds wrote different archives")
	}
	o.Created = o.Created.Add(time.Second)
	c, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	if c.Digest == a.Digest {
		t.Error("a different creation time gave the same digest")
	}
}

func TestRefusesDynamicAndNonELF(t *testing.T) {
	bins := staticBins(t)
	mixed := t.TempDir()
	if err := os.WriteFile(filepath.Join(mixed, "strata"), mustRead(t, filepath.Join(bins, "strata")), 0o755); err != nil {
		t.Fatal(err)
	}
	var dynamic string
	for _, p := range []string{"/bin/ls", "/usr/bin/ls", "/bin/sh"} {
		if _, err := os.Stat(p); err == nil {
			dynamic = p
			break
		}
	}
	if dynamic == "" {
		t.Skip("no dynamic executable on this host")
	}
	if err := os.WriteFile(filepath.Join(mixed, "strata-csi"), mustRead(t, dynamic), 0o755); err != nil {
		t.Fatal(err)
	}
	o := testOptions(t, mixed)
	_, err := Build(o)
	if err == nil || !strings.Contains(err.Error(), "dynamically linked") || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("dynamic binary: error %v, want one saying it is dynamically linked", err)
	}
	if _, serr := os.Stat(o.Out); !os.IsNotExist(serr) {
		t.Errorf("an archive was written despite the error %v", err)
	}

	if err := os.WriteFile(filepath.Join(mixed, "strata-csi"), []byte("#!/bin/sh\necho hi\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(o); err == nil || !strings.Contains(err.Error(), "not an ELF executable") {
		t.Errorf("script: error %v, want one saying it is not an ELF executable", err)
	}

	o.BinDir = bins
	o.Platform = "linux/s390x"
	if runtime.GOARCH != "s390x" {
		if _, err := Build(o); err == nil || !strings.Contains(err.Error(), "not for linux/s390x") {
			t.Errorf("wrong architecture: error %v", err)
		}
	}
}

func TestPush(t *testing.T) {
	bins := staticBins(t)
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	ref := host + "/strata/strata-csi:pushed"
	out := filepath.Join(t.TempDir(), "img.tar")
	ca := testCABundle(t)
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")

	args := []string{"--bin", bins, "--ca-bundle", ca, "--out", out, "--version", "v0.0.1-test",
		"--revision", "0123456789abcdef0123456789abcdef01234567", "--tag", testTag, "--push", ref}
	if err := run(context.Background(), args); err != nil {
		t.Fatal(err)
	}

	o := testOptions(t, bins)
	o.CABundle, o.Out, o.Source = ca, "", defaultSrc
	want, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	got, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	d, err := got.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if d != want.Digest {
		t.Errorf("pushed %s, built %s", d, want.Digest)
	}
	if err := validateLayout(got); err != nil {
		t.Fatal(err)
	}
	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.Labels["org.opencontainers.image.created"] != "2023-11-14T22:13:20Z" {
		t.Errorf("SOURCE_DATE_EPOCH not used: created label %q", cf.Config.Labels["org.opencontainers.image.created"])
	}
}

// elfInterp returns the dynamic loader (PT_INTERP) of an executable.
func elfInterp(t *testing.T, p string) string {
	t.Helper()
	f, err := elf.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			b, err := io.ReadAll(prog.Open())
			if err != nil {
				t.Fatal(err)
			}
			return strings.TrimRight(string(b), "\x00")
		}
	}
	t.Fatalf("%s has no PT_INTERP", p)
	return ""
}

// extractLayer unpacks the image's single layer into dir: directories,
// regular files and symlinks, with their modes.
func extractLayer(t *testing.T, img v1.Image, dir string) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		files, order := layerEntries(t, l)
		for _, n := range order {
			e := files[n]
			p := filepath.Join(dir, filepath.FromSlash(n))
			var err error
			switch e.hdr.Typeflag {
			case tar.TypeDir:
				err = os.MkdirAll(p, os.FileMode(e.hdr.Mode).Perm())
			case tar.TypeReg:
				err = os.WriteFile(p, e.data, os.FileMode(e.hdr.Mode).Perm())
			case tar.TypeSymlink:
				err = os.Symlink(e.hdr.Linkname, p)
			default:
				t.Fatalf("layer entry %s has type %c", n, e.hdr.Typeflag)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestMke2fsRunsInImage unpacks the image and runs its mkfs.ext4 in a chroot
// of it: the libraries and the loader it needs are all there, and it formats
// a file.
func TestMke2fsRunsInImage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestMke2fsRunsInImage needs root: it chroots into the unpacked image")
	}
	o := testOptions(t, staticBins(t))
	o.Out = ""
	res, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	extractLayer(t, res.Image, root)

	out, err := exec.Command("chroot", root, "/sbin/mkfs.ext4", "-V").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "mke2fs 1.") {
		t.Fatalf("chroot %s /sbin/mkfs.ext4 -V: %v\n%s", root, err, out)
	}
	t.Logf("in the image: %s", bytes.TrimSpace(out))

	img := filepath.Join(root, "tmp", "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	// No PATH in the chroot's environment beyond the image's own.
	cmd := exec.Command("chroot", root, "/sbin/mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "in-image", "/tmp/disk.img")
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 in the image: %v\n%s", err, out)
	}
	b := make([]byte, 2048)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if b[1024+0x38] != 0x53 || b[1024+0x39] != 0xef || !bytes.HasPrefix(b[1024+0x78:], []byte("in-image")) {
		t.Errorf("mkfs.ext4 in the image wrote no ext4 superblock labelled in-image")
	}
	// A clone of a claim grows its copy with resize2fs and labels it with
	// tune2fs: both run in the image too. They read /proc/mounts, which the
	// plugin's container has, to refuse a mounted filesystem.
	if err := os.MkdirAll(filepath.Join(root, "proc"), 0o555); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("proc", filepath.Join(root, "proc"), "proc", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(filepath.Join(root, "proc"), unix.MNT_DETACH)
	if err := os.Truncate(img, 128<<20); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"/sbin/resize2fs", "-f", "/tmp/disk.img"}, {"/sbin/tune2fs", "-L", "grown", "/tmp/disk.img"}} {
		cmd := exec.Command("chroot", append([]string{root}, args...)...)
		cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s in the image: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if blocks := binary.LittleEndian.Uint32(b[1024+4:]); int64(blocks)*1024 < 120<<20 && int64(blocks)*4096 < 120<<20 {
		t.Errorf("resize2fs in the image left %d blocks", blocks)
	}
	if !bytes.HasPrefix(b[1024+0x78:], []byte("grown")) {
		t.Errorf("tune2fs in the image did not relabel the filesystem")
	}
}

// TestWithoutMke2fs: an empty Mke2fs builds the image without it (for cross
// builds), and a foreign-architecture mke2fs is refused.
func TestWithoutMke2fs(t *testing.T) {
	o := testOptions(t, staticBins(t))
	o.Out, o.Mke2fs = "", ""
	res, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := res.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	files, _ := layerEntries(t, layers[0])
	for n := range files {
		if strings.HasPrefix(n, "sbin/") || strings.HasPrefix(n, "lib") || n == "etc/mke2fs.conf" {
			t.Errorf("image without mke2fs has %s", n)
		}
	}
	if _, err := mke2fsFiles("/sbin/mke2fs", "", &v1.Platform{OS: "linux", Architecture: "s390x"}); runtime.GOARCH != "s390x" &&
		(err == nil || !strings.Contains(err.Error(), "not for linux/s390x")) {
		t.Errorf("mke2fs for another architecture: %v, want an error", err)
	}
}
