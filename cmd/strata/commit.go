package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/strata-csi/strata/driver/commits/source"
	"github.com/strata-csi/strata/driver/state"
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
		vol, err := findVolume(cmd, e.root, args[0], *targetPath, true)
		if err != nil {
			return err
		}
		creds, err := credentials(cmd, e.stdin, *username, *passwordStdin, *dockerConfig, vol.Image, args[1])
		if err != nil {
			return err
		}
		s, err := e.open(layercache.WithInsecureRegistries(insecure...))
		if err != nil {
			return err
		}
		return runCommit(ctx, cmd, e, s, vol, args[1], creds)
	}
}

// findVolume picks the one publish that arg names: by volume id, or by the
// pod as NAMESPACE/NAME, narrowed by target path if given. With writes, a
// read-only publish is refused: it has none.
func findVolume(cmd *command, root, arg, targetPath string, writes bool) (*state.Volume, error) {
	all, err := state.List(root)
	if err != nil {
		return nil, fmt.Errorf("list the volumes under %s: %w", root, err)
	}
	var match []state.Volume
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
	if v.ReadOnly && writes {
		return nil, usagef(cmd, "volume %q at %s is read-only: it has no writes to %s", v.VolumeID, v.TargetPath, cmd.name)
	}
	return &v, nil
}

// runCommit builds the layer from the volume's upper and pushes it to
// targetRef (a tag), telling what it built and what it uploaded.
func runCommit(ctx context.Context, cmd *command, e *env, s *layercache.Store, v *state.Volume, targetRef string, creds authn.Keychain) error {
	target, err := commit.ParseTarget(s, targetRef)
	if err != nil {
		return usagef(cmd, "TARGET_REF: %v", err)
	}
	src, err := source.OfPublish(e.root, v)
	if err != nil {
		return err
	}
	res, err := commit.Volume(ctx, s, src, target, creds, func(r commit.Result) {
		st := r.Stats
		fmt.Fprintf(e.stdout, "layer %s %d bytes: %d files (%d bytes), %d dirs, %d symlinks, %d hardlinks, %d deletions, %d opaque dirs\n",
			r.Layer, r.LayerBytes, st.Files, st.Bytes, st.Dirs, st.Symlinks, st.Hardlinks, st.Whiteouts, st.Opaques)
		if st.Skipped > 0 {
			fmt.Fprintf(e.stderr, "strata: skipped %d device nodes or sockets, which a layer does not carry\n", st.Skipped)
		}
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "pushed %s@%s, uploaded %d bytes\n", res.Target, res.Digest, res.Uploaded)
	return nil
}
