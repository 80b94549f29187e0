package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

const (
	// mke2fsPath is where mke2fs goes in the image; mkfs.ext4 is a symlink
	// to it in the same directory, as e2fsprogs installs them.
	mke2fsPath      = "sbin/mke2fs"
	mkfsExt4Path    = "sbin/mkfs.ext4"
	mke2fsConfPath  = "etc/mke2fs.conf"
	defaultConfPath = "/etc/mke2fs.conf"
)

// e2fsTools are the tools of e2fsprogs besides mke2fs that go into the
// image, from mke2fs's directory on the build host, each at sbin/<name>: a
// clone of a claim into a larger claim grows its copy offline (resize2fs)
// and labels it with its size (tune2fs). They need no library that mke2fs
// does not (e2fsprogs 1.47), but theirs are added all the same.
var e2fsTools = []string{"resize2fs", "tune2fs"}

// mke2fsFiles returns the image files that make the build host's mke2fs run
// in the image: the binary at /sbin/mke2fs, the symlink /sbin/mkfs.ext4, the
// e2fsTools found beside it at /sbin/<name>, the shared libraries and the
// dynamic loader ldd lists for them, each at the path
// ldd prints (the path the loader looks for, a symlink's target copied as a
// regular file), and /etc/mke2fs.conf. The base image has no libc, so the
// libraries come along; the loader's default search path (the multiarch
// directory in Debian) finds them without an ld.so.cache.
func mke2fsFiles(bin, conf string, plat *v1.Platform) ([]file, error) {
	if conf == "" {
		conf = defaultConfPath
	}
	if err := checkMachine(bin, plat); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("mke2fs: %w: install e2fsprogs (hack/install-deps), or build without it with --mke2fs=", err)
	}
	confData, err := os.ReadFile(conf)
	if err != nil {
		return nil, fmt.Errorf("mke2fs: %w: install e2fsprogs (hack/install-deps)", err)
	}
	files := []file{
		{name: mke2fsPath, mode: 0o755, data: data},
		{name: mkfsExt4Path, mode: 0o777, link: path.Base(mke2fsPath)},
		{name: mke2fsConfPath, mode: 0o644, data: confData},
	}
	libs, err := sharedLibraries(bin)
	if err != nil {
		return nil, err
	}
	for _, name := range e2fsTools {
		p := filepath.Join(filepath.Dir(bin), name)
		if err := checkMachine(p, plat); err != nil {
			return nil, fmt.Errorf("%s (beside %s): %w", name, bin, err)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w: install e2fsprogs (hack/install-deps)", name, err)
		}
		files = append(files, file{name: path.Join(path.Dir(mke2fsPath), name), mode: 0o755, data: data})
		more, err := sharedLibraries(p)
		if err != nil {
			return nil, err
		}
		libs = append(libs, more...)
	}
	sort.Strings(libs)
	libs = slices.Compact(libs)
	for _, lib := range libs {
		// Both follow the symlink libfoo.so.2 -> libfoo.so.2.4.
		b, err := os.ReadFile(lib)
		if err != nil {
			return nil, fmt.Errorf("mke2fs: library %s: %w", lib, err)
		}
		fi, err := os.Stat(lib)
		if err != nil {
			return nil, fmt.Errorf("mke2fs: library %s: %w", lib, err)
		}
		name := strings.TrimPrefix(filepath.ToSlash(filepath.Clean(lib)), "/")
		files = append(files, file{name: name, mode: int64(fi.Mode().Perm()), data: b})
	}
	return files, nil
}

// checkMachine refuses a bin that is not an ELF executable for plat: the
// build host's mke2fs only runs in an image of the host's architecture.
func checkMachine(bin string, plat *v1.Platform) error {
	f, err := elf.Open(bin)
	if err != nil {
		return fmt.Errorf("mke2fs: %w: install e2fsprogs (hack/install-deps), or build without it with --mke2fs=", err)
	}
	defer f.Close()
	want, ok := elfMachine[plat.Architecture]
	if !ok {
		return fmt.Errorf("platform %s: unknown architecture %q", plat, plat.Architecture)
	}
	if f.Machine != want {
		return fmt.Errorf("mke2fs %s is built for %v, not for %s: build the image on a %s host, or without mke2fs (--mke2fs=; persistent clones then fail)",
			bin, f.Machine, plat, plat.Architecture)
	}
	return nil
}

// sharedLibraries runs ldd on bin and returns the absolute paths it lists:
// the libraries ("libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)")
// and the dynamic loader ("/lib64/ld-linux-x86-64.so.2 (0x...)"), sorted.
// The vDSO has no file and is left out; a library ldd cannot find is an
// error.
func sharedLibraries(bin string) ([]string, error) {
	cmd := exec.Command("ldd", bin)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(bytes.TrimSpace(ee.Stderr))
		}
		return nil, fmt.Errorf("ldd %s: %w %s", bin, err, msg)
	}
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		var p string
		if name, rest, ok := strings.Cut(line, "=>"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 || f[0] == "not" {
				return nil, fmt.Errorf("ldd %s: %s is not found on the build host", bin, strings.TrimSpace(name))
			}
			p = f[0]
		} else if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "/") {
			p = f[0]
		}
		if strings.HasPrefix(p, "/") {
			seen[p] = true
		}
	}
	if len(seen) == 0 {
		return nil, fmt.Errorf("ldd %s lists no libraries: %q", bin, out)
	}
	libs := make([]string, 0, len(seen))
	for p := range seen {
		libs = append(libs, p)
	}
	sort.Strings(libs)
	return libs, nil
}

// withParents adds a directory entry (0755) for every parent directory of
// files that has none.
func withParents(files []file) []file {
	have := map[string]bool{}
	for _, f := range files {
		have[f.name] = true
	}
	for _, f := range files {
		for d := path.Dir(strings.TrimSuffix(f.name, "/")); d != "." && d != "/"; d = path.Dir(d) {
			if !have[d+"/"] {
				have[d+"/"] = true
				files = append(files, file{name: d + "/", mode: 0o755})
			}
		}
	}
	return files
}
