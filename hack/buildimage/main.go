// Command buildimage builds the Strata container image without Docker: one
// image per node holding the CSI plugin (strata-csi, the entrypoint) and the
// operator CLI (strata), on a minimal base generated from files (root in
// /etc/passwd and /etc/group, /etc/nsswitch.conf, the host's CA bundle, /tmp),
// plus the build host's mke2fs (/sbin/mke2fs, /sbin/mkfs.ext4 and
// /etc/mke2fs.conf) and the resize2fs and tune2fs beside it (/sbin), with
// the shared libraries and dynamic loader ldd lists for them: persistent
// clones format their ext4 images with mke2fs, and a clone of a claim into
// a larger one grows and labels its copy with the other two. Nothing is
// pulled.
//
// Usage:
//
//	buildimage --bin bin --out bin/strata-image.tar [--tag REF] [--version V]
//	           [--revision SHA] [--source URL] [--platform linux/amd64] [--push REF]
//	           [--mke2fs /sbin/mke2fs]
//
// The binaries must be static (make build uses CGO_ENABLED=0); dynamic ones
// are refused. mke2fs is dynamic and comes with its libraries, so it only
// runs in an image of the build host's architecture: a cross build needs
// --mke2fs= (no mke2fs; persistent clones then fail on that node). The output is an OCI image layout archive whose index.json
// names the image (org.opencontainers.image.ref.name and containerd's
// io.containerd.image.name) and which also carries a docker-style
// manifest.json with RepoTags, so that both
//
//	ctr -n k8s.io images import bin/strata-image.tar
//	docker load -i bin/strata-image.tar
//
// load it under the tag, and crane push bin/strata-image.tar REF pushes it.
// --push REF pushes it directly (plain HTTP for loopback registries, or with
// --insecure).
//
// Builds are reproducible: the same binaries, CA bundle and flags give the
// same digest. The creation time (label org.opencontainers.image.created,
// and every file's mtime) is $SOURCE_DATE_EPOCH if set, else the commit
// time of --revision, else now.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "buildimage: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	var (
		o        Options
		push     string
		insecure bool
	)
	fs := flag.NewFlagSet("buildimage", flag.ContinueOnError)
	fs.StringVar(&o.BinDir, "bin", "bin", "directory holding the static strata-csi and strata binaries")
	fs.StringVar(&o.Out, "out", "", "write the image as an OCI archive here, e.g. bin/strata-image.tar (empty: only with --push)")
	fs.StringVar(&o.Tag, "tag", "", "the image's name in the archive (default localhost/strata/strata-csi:VERSION)")
	fs.StringVar(&o.Version, "version", "", "image version label (default: git describe --tags --always --dirty, else dev)")
	fs.StringVar(&o.Revision, "revision", "", "source revision label (default: git rev-parse HEAD, if in a git checkout)")
	fs.StringVar(&o.Source, "source", defaultSrc, "source repository label")
	fs.StringVar(&o.Platform, "platform", "linux/"+runtime.GOARCH, "the binaries' platform, os/arch[/variant]")
	fs.StringVar(&o.CABundle, "ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "CA bundle copied into the image")
	fs.StringVar(&o.Mke2fs, "mke2fs", "/sbin/mke2fs", "the build host's mke2fs, copied into the image with its libraries as /sbin/mke2fs and /sbin/mkfs.ext4, with the resize2fs and tune2fs beside it (persistent clones need them); empty: none")
	fs.StringVar(&o.Mke2fsConf, "mke2fs-conf", defaultConfPath, "copied to /etc/mke2fs.conf with --mke2fs")
	fs.StringVar(&push, "push", "", "also push the image to this reference, e.g. 127.0.0.1:5000/strata/strata-csi:dev")
	fs.BoolVar(&insecure, "insecure", false, "push over plain HTTP to any registry (loopback registries always use it)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: buildimage --bin DIR --out FILE.tar [--tag REF] [--push REF] [flags]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if o.Out == "" && push == "" {
		return errors.New("nothing to do: give --out FILE.tar and/or --push REF")
	}
	if o.Version == "" {
		o.Version = gitOutput("describe", "--tags", "--always", "--dirty")
		if o.Version == "" {
			o.Version = "dev"
		}
	}
	if o.Revision == "" {
		o.Revision = gitOutput("rev-parse", "HEAD")
	}
	if o.Tag == "" {
		o.Tag = "localhost/strata/strata-csi:" + o.Version
	}
	created, err := creationTime(o.Revision)
	if err != nil {
		return err
	}
	o.Created = created

	var pushRef name.Reference
	if push != "" {
		var nopts []name.Option
		if insecure {
			nopts = append(nopts, name.Insecure)
		}
		if pushRef, err = name.ParseReference(push, nopts...); err != nil {
			return fmt.Errorf("--push: %w", err)
		}
	}

	res, err := Build(o)
	if err != nil {
		return err
	}
	if o.Out != "" {
		fmt.Printf("%s %s@%s\n", o.Out, res.Tag.Name(), res.Digest)
		fmt.Printf("  image %s bytes (compressed), archive %s bytes\n", humanBytes(res.Size), humanBytes(res.ArchiveSize))
	} else {
		fmt.Printf("%s@%s  image %s bytes (compressed)\n", res.Tag.Name(), res.Digest, humanBytes(res.Size))
	}
	if pushRef != nil {
		start := time.Now()
		if err := remote.Write(pushRef, res.Image,
			remote.WithContext(ctx),
			remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
			return fmt.Errorf("push %s: %w", pushRef, err)
		}
		fmt.Printf("pushed %s@%s in %.1fs\n", pushRef.Context().Name(), res.Digest, time.Since(start).Seconds())
	}
	return nil
}

// creationTime is $SOURCE_DATE_EPOCH, else the commit time of revision, else now.
func creationTime(revision string) (time.Time, error) {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: not a number of seconds", s)
		}
		return time.Unix(sec, 0).UTC(), nil
	}
	if revision != "" {
		if s := gitOutput("log", "-1", "--format=%ct", revision); s != "" {
			if sec, err := strconv.ParseInt(s, 10, 64); err == nil {
				return time.Unix(sec, 0).UTC(), nil
			}
		}
	}
	return time.Now().UTC().Truncate(time.Second), nil
}

// gitOutput runs git and returns its trimmed output, or "" if it fails.
func gitOutput(args ...string) string {
	out, err := exec.Command("git", args...).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// humanBytes formats n with thousands separators.
func humanBytes(n int64) string {
	s := strconv.FormatInt(n, 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
