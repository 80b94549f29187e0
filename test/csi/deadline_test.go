package csitest

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/test/testimage"
)

// TestPublishOutlivesKubeletDeadline: a cold pull that takes longer than the
// caller's deadline goes on in the background; the call fails with
// DeadlineExceeded and leaves nothing mounted, and kubelet's retry joins the
// pull in flight: every blob is downloaded once.
func TestPublishOutlivesKubeletDeadline(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// 2 MiB in 32 KiB chunks, 30 ms apart: about two seconds.
	blobs := newBlobRegistry(t, 30*time.Millisecond)
	reg := blobs.addr
	weights := make([]byte, 2<<20)
	if _, err := rand.Read(weights); err != nil {
		t.Fatal(err)
	}
	ref := reg + "/slow/model:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("weights.bin", string(weights))), testimage.Gzip)))
	blobs.reset()

	tgt := e.target("slow")
	req := pubReq("slow", tgt, map[string]string{"image": ref})
	short, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := e.Node.NodePublishVolume(short, req)
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("publish with a short deadline: %v, want DeadlineExceeded", err)
	}
	if n := mountCount(t, tgt); n != 0 {
		t.Fatalf("%d mounts at the target after the failed call, want 0", n)
	}

	// kubelet retries with backoff; until the first call has unwound, the
	// plugin answers Aborted (another operation on the volume is running).
	start := time.Now()
	for {
		_, err := e.Node.NodePublishVolume(ctx(t), req)
		if err == nil {
			break
		}
		if status.Code(err) != codes.Aborted || time.Since(start) > 30*time.Second {
			t.Fatalf("retry: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	joined := time.Since(start)
	if got := readString(t, tgt+"/weights.bin"); got != string(weights) {
		t.Fatalf("weights.bin differs from the image's (%d bytes)", len(got))
	}
	for blob, n := range blobs.counts() {
		if n != 1 {
			t.Errorf("blob %s downloaded %d times, want 1", blob, n)
		}
	}
	t.Logf("the retry joined the pull in flight and returned after %s", joined)
	if err := e.unpublish("slow", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}
