package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/volumes"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/layercache/commit"
)

func init() {
	register(&command{
		name:    "commit",
		args:    "VOLUME TARGET_REF",
		summary: "Push a volume's image plus the volume's writes, as one new layer, to a registry",
		flags:   commitFlags,
	})
}

func commitFlags(fs *flag.FlagSet) func(context.Context, *env, []string) error {
	targetPath := fs.String("target-path", "", "the publish's target path, when VOLUME is published more than once on this node")
	var insecure stringList
	fs.Var(&insecure, "insecure-registry", "reach this registry (host or host:port) over plain HTTP; repeatable (loopback registries always are)")
	username := fs.String("username", "", "user name for the registries (the password is read from stdin with --password-stdin)")
	passwordStdin := fs.Bool("password-stdin", false, "read the registry password from stdin")
	dockerConfig := fs.String("docker-config", "", "read credentials from this dockerconfigjson file; it needs push access to TARGET_REF and pull access to the volume's image")

	return func(ctx context.Context, e *env, args []string) error {
		cmd := commands["commit"]
		if len(args) != 2 {
			return usagef(cmd, "commit needs a volume and a target image reference, got %d arguments", len(args))
		}
		creds, err := credentials(cmd, e.stdin, *username, *passwordStdin, *dockerConfig)
		if err != nil {
			return err
		}
		vol, err := findVolume(cmd, e.root, args[0], *targetPath)
		if err != nil {
			return err
		}
		s, err := e.open(layercache.WithInsecureRegistries(insecure...))
		if err != nil {
			return err
		}
		base, target, err := commitRefs(cmd, s, vol, args[1])
		if err != nil {
			return err
		}
		return runCommit(ctx, e, s, vol, base, target, creds)
	}
}

// findVolume picks the one publish that arg names: by volume id, or by the
// pod as NAMESPACE/NAME, narrowed by target path if given.
func findVolume(cmd *command, root, arg, targetPath string) (*volumes.Volume, error) {
	all, err := volumes.List(root)
	if err != nil {
		return nil, fmt.Errorf("list the volumes under %s: %w", root, err)
	}
	var match []volumes.Volume
	for _, v := range all {
		if v.VolumeID != arg && v.Pod() != arg {
			continue
		}
		if targetPath != "" && filepath.Clean(v.TargetPath) != filepath.Clean(targetPath) {
			continue
		}
		match = append(match, v)
	}
	switch {
	case len(match) == 0 && targetPath != "":
		return nil, usagef(cmd, "no volume %q is published at %s on this node (strata ls lists the volumes)", arg, targetPath)
	case len(match) == 0:
		return nil, usagef(cmd, "no volume or pod %q is published on this node (strata ls lists the volumes)", arg)
	case len(match) > 1:
		var where []string
		for _, v := range match {
			w := v.TargetPath
			if v.Pod() != "" {
				w += " (pod " + v.Pod() + ")"
			}
			where = append(where, w)
		}
		return nil, usagef(cmd, "%q is published %d times on this node: name the pod as NAMESPACE/NAME or pass --target-path, one of: %s",
			arg, len(match), strings.Join(where, ", "))
	}
	v := match[0]
	if v.ReadOnly {
		return nil, usagef(cmd, "volume %q at %s is read-only: it has no writes to commit", v.VolumeID, v.TargetPath)
	}
	if n := len(v.Images()); n > 1 {
		return nil, fmt.Errorf("%w: volume %q stacks %d images; commit supports single-image volumes only "+
			"(a stacked image spans repositories, and its layers would have to be copied)", layercache.ErrUnsupported, v.VolumeID, n)
	}
	return &v, nil
}

// commitRefs returns the volume's base image by digest, and the tag to push.
func commitRefs(cmd *command, s *layercache.Store, v *volumes.Volume, targetRef string) (name.Digest, name.Tag, error) {
	r, err := s.ParseReference(targetRef)
	if err != nil {
		return name.Digest{}, name.Tag{}, usagef(cmd, "TARGET_REF: %v", err)
	}
	target, ok := r.(name.Tag)
	if !ok {
		return name.Digest{}, name.Tag{}, usagef(cmd, "TARGET_REF %q names a digest: give a tag (the digest is the result)", targetRef)
	}
	img, err := s.ParseReference(v.Image)
	if err != nil {
		return name.Digest{}, name.Tag{}, fmt.Errorf("volume %q: its image %q: %w", v.VolumeID, v.Image, err)
	}
	// The digest the volume was published with, not what the tag says now.
	br, err := s.ParseReference(img.Context().String() + "@" + v.Digest.String())
	if err != nil {
		return name.Digest{}, name.Tag{}, fmt.Errorf("volume %q: its image digest %q: %w", v.VolumeID, v.Digest, err)
	}
	return br.(name.Digest), target, nil
}

// runCommit builds the layer from the volume's upper and pushes it.
func runCommit(ctx context.Context, e *env, s *layercache.Store, v *volumes.Volume, base name.Digest, target name.Tag, creds *layercache.Credentials) error {
	upper := volumes.Upper(e.root, v.Key)
	if _, err := os.Stat(upper); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("volume %q: its upper directory %s is gone: was it unpublished?", v.VolumeID, upper)
	}
	log := klog.FromContext(ctx).WithValues("volumeID", v.VolumeID, "targetPath", v.TargetPath, "image", base.String())
	log.V(2).Info("Building the layer of the volume's writes", "upper", upper)
	layer, err := commit.Build(ctx, upper, s.WorkDir())
	if err != nil {
		return fmt.Errorf("volume %q: %w", v.VolumeID, err)
	}
	defer layer.Close()
	st := layer.Stats
	size, _ := layer.Size()
	digest, _ := layer.Digest()
	fmt.Fprintf(e.stdout, "layer %s %d bytes: %d files (%d bytes), %d dirs, %d symlinks, %d hardlinks, %d deletions, %d opaque dirs\n",
		digest, size, st.Files, st.Bytes, st.Dirs, st.Symlinks, st.Hardlinks, st.Whiteouts, st.Opaques)
	if st.Skipped > 0 {
		fmt.Fprintf(e.stderr, "strata: skipped %d device nodes or sockets, which a layer does not carry\n", st.Skipped)
	}
	createdBy := "strata commit of volume " + v.VolumeID
	if v.Pod() != "" {
		createdBy += " (pod " + v.Pod() + ")"
	}
	var sent commit.Counter
	opts := s.RemoteOptions(ctx, creds, sent.Wrap)
	newDigest, err := commit.Push(ctx, base, target, layer, createdBy, layercache.ClassifyRegistryError, opts...)
	if err != nil {
		return err
	}
	log.V(1).Info("Committed volume", "target", target.String(), "digest", newDigest, "uploadedBytes", sent.Sent())
	fmt.Fprintf(e.stdout, "pushed %s@%s, uploaded %d bytes\n", target, newDigest, sent.Sent())
	return nil
}
