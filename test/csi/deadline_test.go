package csitest

import (
	"context"
	"crypto/rand"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/test/testimage"
)

// slowWriter trickles a response out in small chunks.
type slowWriter struct {
	http.ResponseWriter
	delay time.Duration
}

func (w slowWriter) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		c := min(len(b), 32<<10)
		m, err := w.ResponseWriter.Write(b[:c])
		n += m
		if err != nil {
			return n, err
		}
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		b = b[c:]
		time.Sleep(w.delay)
	}
	return n, nil
}

// TestPublishOutlivesKubeletDeadline: a cold pull that takes longer than the
// caller's deadline goes on in the background; the call fails with
// DeadlineExceeded and leaves nothing mounted, and kubelet's retry joins the
// pull in flight: every blob is downloaded once.
func TestPublishOutlivesKubeletDeadline(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var mu sync.Mutex
	gets := map[string]int{}
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				mu.Lock()
				gets[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]++
				mu.Unlock()
				// 2 MiB in 32 KiB chunks, 30 ms apart: about two seconds.
				w = slowWriter{ResponseWriter: w, delay: 30 * time.Millisecond}
			}
			next.ServeHTTP(w, r)
		})
	})
	weights := make([]byte, 2<<20)
	if _, err := rand.Read(weights); err != nil {
		t.Fatal(err)
	}
	ref := reg + "/slow/model:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("weights.bin", string(weights))), testimage.Gzip)))
	mu.Lock()
	clear(gets)
	mu.Unlock()

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
	mu.Lock()
	for blob, n := range gets {
		if n != 1 {
			t.Errorf("blob %s downloaded %d times, want 1", blob, n)
		}
	}
	mu.Unlock()
	t.Logf("the retry joined the pull in flight and returned after %s", joined)
	if err := e.unpublish("slow", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}
