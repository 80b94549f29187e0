package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

func TestToStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{fmt.Errorf("pull: %w", layercache.ErrNotFound), codes.NotFound},
		{fmt.Errorf("pull: %w", layercache.ErrNotCached), codes.NotFound},
		{fmt.Errorf("pull: %w", layercache.ErrUnauthorized), codes.PermissionDenied},
		{fmt.Errorf("pull: %w", layercache.ErrUnavailable), codes.Unavailable},
		{fmt.Errorf("pull: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{fmt.Errorf("pull: %w", layercache.ErrDigestMismatch), codes.DataLoss},
		{fmt.Errorf("pull: %w", layercache.ErrCorruptLayer), codes.DataLoss},
		{fmt.Errorf("pull: %w", layercache.ErrUnsafeLayer), codes.FailedPrecondition},
		{fmt.Errorf("pull: %w", layercache.ErrInvalidReference), codes.InvalidArgument},
		{fmt.Errorf("mount: %w", mount.ErrTooManyLayers), codes.InvalidArgument},
		{fmt.Errorf("unpack: %w", syscall.ENOSPC), codes.ResourceExhausted},
		{fmt.Errorf("pull: %w", layercache.ErrNoSpace), codes.ResourceExhausted},
		{fmt.Errorf("pull: %w", layercache.ErrLayerTooLarge), codes.ResourceExhausted},
		{fmt.Errorf("unpack: %w", syscall.EDQUOT), codes.ResourceExhausted},
		{fmt.Errorf("pull: %w", layercache.ErrUnsupported), codes.InvalidArgument},
		// A layer pruned between Ensure and Acquire, every time the publish
		// tried: it was overtaken, and kubelet's retry ensures it again.
		{fmt.Errorf("acquire: %w", layercache.ErrLayerMissing), codes.Aborted},
		{fmt.Errorf("publish: %w", context.Canceled), codes.Aborted},
		{errors.Join(errors.New("a"), fmt.Errorf("b: %w", layercache.ErrUnavailable)), codes.Unavailable},
		{invalid("bad"), codes.InvalidArgument},
		{fault.Errorf(engine.ErrBusy, "busy"), codes.Aborted},
		{fmt.Errorf("publish: %w", engine.ErrConflict), codes.AlreadyExists},
		{fault.Errorf(engine.ErrNotStaged, "stage first"), codes.FailedPrecondition},
		{fault.Errorf(engine.ErrBaseChanged, "other image"), codes.FailedPrecondition},
		{fault.Errorf(engine.ErrNotPublished, "not here"), codes.NotFound},
		{fault.Errorf(clones.ErrInUse, "staged"), codes.FailedPrecondition},
		{status.Error(codes.OutOfRange, "kept"), codes.OutOfRange},
		{errors.New("something else"), codes.Internal},
	} {
		if got := status.Code(toStatus(tc.err)); got != tc.want {
			t.Errorf("toStatus(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

func TestCreateVolumeIsIdempotentByName(t *testing.T) {
	d, err := New(Config{Mode: ModeController})
	if err != nil {
		t.Fatal(err)
	}
	req := func(image string, size int64) *csi.CreateVolumeRequest {
		return &csi.CreateVolumeRequest{
			Name: "pvc-1", Parameters: map[string]string{"image": image, "csi.storage.k8s.io/pvc/name": "data"},
			CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)},
		}
	}
	a, err := d.CreateVolume(context.Background(), req("r/x:v1", 1<<30))
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.CreateVolume(context.Background(), req("r/x:v1", 1<<30))
	if err != nil {
		t.Fatal(err)
	}
	if a.Volume.VolumeId != b.Volume.VolumeId || !strings.HasPrefix(a.Volume.VolumeId, volumeIDPrefix) {
		t.Errorf("volume ids %q and %q: want one stable strata- id", a.Volume.VolumeId, b.Volume.VolumeId)
	}
	if _, ok := a.Volume.VolumeContext["csi.storage.k8s.io/pvc/name"]; ok || a.Volume.VolumeContext["image"] != "r/x:v1" {
		t.Errorf("volume context %v: want the image and no provisioner keys", a.Volume.VolumeContext)
	}
	if _, err := d.CreateVolume(context.Background(), req("r/x:v1", 2<<30)); status.Code(toStatus(err)) != codes.AlreadyExists {
		t.Errorf("same name, other size: %v, want AlreadyExists", err)
	}
	if _, err := d.CreateVolume(context.Background(), req("r/y:v1", 1<<30)); status.Code(toStatus(err)) != codes.AlreadyExists {
		t.Errorf("same name, other image: %v, want AlreadyExists", err)
	}
	block := req("r/x:v1", 1<<30)
	block.Name = "pvc-2"
	block.VolumeCapabilities = []*csi.VolumeCapability{{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	if _, err := d.CreateVolume(context.Background(), block); status.Code(toStatus(err)) != codes.InvalidArgument {
		t.Errorf("block access: %v, want InvalidArgument", err)
	}
}

func TestSocketPath(t *testing.T) {
	for in, want := range map[string]string{
		"unix:///var/lib/kubelet/plugins/strata.csi.dev/csi.sock": "/var/lib/kubelet/plugins/strata.csi.dev/csi.sock",
		"unix://tmp/csi.sock": "tmp/csi.sock",
		"/csi/csi.sock":       "/csi/csi.sock",
		"relative/csi.sock":   "relative/csi.sock",
	} {
		if got, err := SocketPath(in); err != nil || got != want {
			t.Errorf("SocketPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "tcp://127.0.0.1:10000", "unix://"} {
		if got, err := SocketPath(in); err == nil {
			t.Errorf("SocketPath(%q) = %q, want an error", in, got)
		}
	}
}
