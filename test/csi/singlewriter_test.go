package csitest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// TestSingleWriter: a volume published single-writer (ReadWriteOncePod)
// is refused at a second target, single-writer or not, and so is a
// single-writer publish while another target has the volume; once the
// single-writer publish is gone, its mark goes and others publish freely.
func TestSingleWriter(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ref := testimage.Registry(t) + "/rwop/img:v1"
	pushBase(t, ref, "v1")
	attrs := map[string]string{"image": ref}
	sw := func(volID, target string) *csi.NodePublishVolumeRequest {
		req := pubReq(volID, target, attrs)
		req.VolumeCapability = mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
		return req
	}
	marks := func() []string {
		m, err := filepath.Glob(filepath.Join(e.root, "volumes", "single-writer.*"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	t1, t2, t3 := e.target("rwop-1"), e.target("rwop-2"), e.target("rwop-3")
	e.publish(sw("rwop", t1))
	e.publish(sw("rwop", t1)) // the same publish again: a no-op
	if len(marks()) != 1 {
		t.Errorf("single-writer marks after a single-writer publish: %v, want one", marks())
	}
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("rwop", t2, attrs))
	wantCode(t, err, codes.FailedPrecondition, "single-writer", t1)
	_, err = e.Node.NodePublishVolume(ctx(t), sw("rwop", t2))
	wantCode(t, err, codes.FailedPrecondition, "single-writer", t1)
	if n := mountCount(t, t2); n != 0 {
		t.Errorf("refused publish left %d mounts at %s", n, t2)
	}
	// Another volume is not concerned.
	e.publish(pubReq("other", t3, attrs))

	if err := e.unpublish("rwop", t1); err != nil {
		t.Fatal(err)
	}
	if m := marks(); len(m) != 0 {
		t.Errorf("single-writer marks after the single-writer publish went: %v", m)
	}
	e.publish(pubReq("rwop", t2, attrs))
	_, err = e.Node.NodePublishVolume(ctx(t), sw("rwop", t1))
	wantCode(t, err, codes.FailedPrecondition, "single-writer", t2)
	if m := marks(); len(m) != 0 {
		t.Errorf("a refused single-writer publish left its mark: %v", m)
	}
	for _, p := range [][2]string{{"rwop", t2}, {"other", t3}} {
		if err := e.unpublish(p[0], p[1]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(t1); !os.IsNotExist(err) {
		t.Errorf("target %s of a refused publish: %v, want it gone", t1, err)
	}
}
