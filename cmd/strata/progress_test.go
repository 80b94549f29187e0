package main

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/layercache"
)

// TestProgressLines: off a terminal, a layer that downloads gets a plain
// line every plainEvery with its bytes, rate and time left, and one when it
// is done; an artifact's files are followed like layers.
func TestProgressLines(t *testing.T) {
	hash := func(c string) v1.Hash { return v1.Hash{Algorithm: "sha256", Hex: strings.Repeat(c, 64)} }
	big := layercache.Layer{DiffID: hash("a"), Size: 4e9}
	file := layercache.Layer{DiffID: hash("b"), Size: 2e6}
	img := &layercache.Image{Ref: "r/m:v1", Layers: []layercache.Layer{big}, Files: []layercache.RawFile{{Path: "w.bin", Layer: file}}}
	var out bytes.Buffer
	p := newProgress(&out, false, img)
	clock := time.Unix(1000, 0)
	p.now = func() time.Time { return clock }
	step := func(d time.Duration, e layercache.ProgressEvent) {
		clock = clock.Add(d)
		p.event(e)
	}
	step(0, layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 1})
	step(5*time.Second, layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 5e8})
	if out.Len() != 0 {
		t.Errorf("a line before plainEvery: %q", out.String())
	}
	step(5*time.Second, layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 1e9})
	step(time.Second, layercache.ProgressEvent{Layer: file, State: layercache.LayerDone})
	p.stop()
	want := "layer " + shortDigest(big.DiffID) + " pulling 1000.0 MB / 4000.0 MB, 100.0 MB/s, about 30s left\n" +
		"layer " + shortDigest(file.DiffID) + " 2.0 MB pulled\n"
	if out.String() != want {
		t.Errorf("lines:\n%s\nwant:\n%s", out.String(), want)
	}
}

// TestProgressTerminal: on a terminal, a downloading layer's line shows its
// bytes, its rate and the time left.
func TestProgressTerminal(t *testing.T) {
	big := layercache.Layer{DiffID: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("c", 64)}, Size: 4e9}
	var out safeBuffer
	p := newProgress(&out, true, &layercache.Image{Ref: "r/m:v1", Layers: []layercache.Layer{big}})
	clock := time.Unix(1000, 0)
	p.mu.Lock()
	p.now = func() time.Time { return clock }
	p.mu.Unlock()
	p.event(layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 1})
	p.mu.Lock()
	clock = clock.Add(10 * time.Second)
	p.mu.Unlock()
	p.event(layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 1e9})
	p.stop()
	if s := out.String(); !strings.Contains(s, "1000.0 MB / 4000.0 MB  100.0 MB/s  ETA 30s") {
		t.Errorf("terminal view %q lacks the layer's bytes, rate and time left", s)
	}
}

// safeBuffer is a bytes.Buffer that the redraw goroutine and the test may
// share.
type safeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *safeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *safeBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
