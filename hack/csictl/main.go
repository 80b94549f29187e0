// Command csictl drives a CSI plugin's node service over its socket the way
// kubelet does, for demos and manual testing:
//
//	csictl --endpoint unix:///tmp/csi.sock publish --volume-id v1 --target /mnt/v1 --image REF [--readonly] [--sub-path DIR] [--pull-policy P]
//	csictl --endpoint unix:///tmp/csi.sock unpublish --volume-id v1 --target /mnt/v1
//	csictl --endpoint unix:///tmp/csi.sock stats --volume-id v1 --target /mnt/v1
//	csictl --endpoint unix:///tmp/csi.sock probe
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "csictl:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	global := flag.NewFlagSet("csictl", flag.ContinueOnError)
	endpoint := global.String("endpoint", "unix:///var/lib/kubelet/plugins/strata.csi.dev/csi.sock", "plugin socket")
	timeout := global.Duration("timeout", 2*time.Minute, "call deadline (kubelet uses about two minutes)")
	if err := global.Parse(args); err != nil {
		return err
	}
	if global.NArg() == 0 {
		return fmt.Errorf("usage: csictl [--endpoint unix:///path] publish|unpublish|stats|probe [flags]")
	}
	cmd, rest := global.Arg(0), global.Args()[1:]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	volID := fs.String("volume-id", "", "volume id")
	target := fs.String("target", "", "target path (its parent must exist, as kubelet makes it)")
	image := fs.String("image", "", "image reference (publish)")
	readOnly := fs.Bool("readonly", false, "publish read-only (publish)")
	subPath := fs.String("sub-path", "", "publish only this directory of the image (publish)")
	policy := fs.String("pull-policy", "", "IfNotPresent, Always or Never (publish)")
	if err := fs.Parse(rest); err != nil {
		return err
	}
	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	node := csi.NewNodeClient(conn)
	abs := func(p string) string {
		if p == "" {
			return p
		}
		a, _ := filepath.Abs(p)
		return a
	}
	switch cmd {
	case "probe":
		resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			return err
		}
		fmt.Println("ready:", resp.GetReady().GetValue())
	case "publish":
		vctx := map[string]string{"image": *image}
		if *subPath != "" {
			vctx["subPath"] = *subPath
		}
		if *policy != "" {
			vctx["pullPolicy"] = *policy
		}
		mode := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
		if *readOnly {
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
		}
		start := time.Now()
		_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
			VolumeId: *volID, TargetPath: abs(*target), Readonly: *readOnly, VolumeContext: vctx,
			VolumeCapability: &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
			},
		})
		if err != nil {
			return err
		}
		fmt.Printf("published %s at %s in %s\n", *volID, abs(*target), time.Since(start).Round(time.Millisecond))
	case "unpublish":
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: *volID, TargetPath: abs(*target)}); err != nil {
			return err
		}
		fmt.Printf("unpublished %s from %s\n", *volID, abs(*target))
	case "stats":
		resp, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: *volID, VolumePath: abs(*target)})
		if err != nil {
			return err
		}
		var parts []string
		for _, u := range resp.GetUsage() {
			parts = append(parts, fmt.Sprintf("%s used=%d available=%d", strings.ToLower(u.GetUnit().String()), u.GetUsed(), u.GetAvailable()))
		}
		fmt.Println(strings.Join(parts, "; "))
	default:
		return fmt.Errorf("unknown command %q: use publish, unpublish, stats or probe", cmd)
	}
	return nil
}
