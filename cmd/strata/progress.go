package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/layercache"
)

// redrawInterval bounds how often the terminal view is redrawn: about ten
// times a second is smooth to the eye and cheap over a slow SSH link.
const redrawInterval = 100 * time.Millisecond

// layerProgress is what the progress view knows about one layer.
type layerProgress struct {
	layer layercache.Layer
	state string // "waiting", "pulling", "cached", "pulled"
	done  int64  // compressed bytes received
	// started is when its first bytes came, printed when its last plain
	// line was written.
	started, printed time.Time
}

// speed returns the layer's rate so far and, at that rate, the time left
// ("" for each until bytes have come).
func (l *layerProgress) speed(now time.Time) (rate, left string) {
	elapsed := now.Sub(l.started)
	if l.started.IsZero() || l.done == 0 || elapsed <= 0 {
		return "", ""
	}
	r := float64(l.done) / elapsed.Seconds()
	rate = megabytes(int64(r)) + "/s"
	if rest := l.layer.Size - l.done; rest > 0 {
		left = time.Duration(float64(rest) / r * float64(time.Second)).Round(time.Second).String()
	}
	return rate, left
}

// plainEvery is how often a layer that is downloading gets a line of its
// own when the output is not a terminal.
const plainEvery = 10 * time.Second

func (l *layerProgress) final() bool { return l.state == "cached" || l.state == "pulled" }

// progress shows a pull's progress: redrawn in place on a terminal, or one
// line per finished layer otherwise (logs, CI, pipes). Its event method is
// called from several goroutines.
type progress struct {
	w     io.Writer
	tty   bool
	start time.Time
	now   func() time.Time // time.Now; tests set it

	mu     sync.Mutex
	order  []v1.Hash // distinct diffIDs, bottom first
	layers map[v1.Hash]*layerProgress
	dirty  bool
	drawn  int // lines the last redraw wrote

	stopOnce sync.Once
	stopc    chan struct{}
	donec    chan struct{}
}

// newProgress starts showing the progress of pulling img's layers.
func newProgress(w io.Writer, tty bool, img *layercache.Image) *progress {
	p := &progress{w: w, tty: tty, start: time.Now(), now: time.Now, layers: map[v1.Hash]*layerProgress{},
		stopc: make(chan struct{}), donec: make(chan struct{})}
	all := slices.Clone(img.Layers)
	for _, f := range img.Files { // an artifact's files, each fetched on its own
		all = append(all, f.Layer)
	}
	for _, l := range all {
		if _, ok := p.layers[l.DiffID]; ok {
			continue // the same layer twice in one image is stored once
		}
		p.order = append(p.order, l.DiffID)
		p.layers[l.DiffID] = &layerProgress{layer: l, state: "waiting"}
	}
	if !tty {
		close(p.donec)
		return p
	}
	p.dirty = true
	go p.redrawLoop()
	return p
}

// event records one progress event; it is layercache's Progress callback.
func (p *progress) event(e layercache.ProgressEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	l, ok := p.layers[e.Layer.DiffID]
	if !ok || l.final() {
		return
	}
	switch e.State {
	case layercache.LayerCached:
		l.state = "cached"
	case layercache.LayerFetching:
		now := p.now()
		if l.started.IsZero() {
			l.started, l.printed = now, now
		}
		l.state = "pulling"
		l.done = e.Done
		if !p.tty && now.Sub(l.printed) >= plainEvery {
			l.printed = now
			rate, left := l.speed(now)
			line := fmt.Sprintf("layer %s pulling %s / %s", shortDigest(l.layer.DiffID), megabytes(l.done), megabytes(l.layer.Size))
			if rate != "" {
				line += ", " + rate
			}
			if left != "" {
				line += ", about " + left + " left"
			}
			fmt.Fprintln(p.w, line)
		}
	case layercache.LayerJoined:
		l.state = "joined"
	case layercache.LayerDone:
		l.state = "pulled"
	default:
		return
	}
	p.dirty = true
	if !p.tty && l.final() {
		fmt.Fprintf(p.w, "layer %s %s %s\n", shortDigest(l.layer.DiffID), megabytes(l.layer.Size), l.state)
	}
}

// stop ends the live view, drawing it a last time.
func (p *progress) stop() {
	p.stopOnce.Do(func() { close(p.stopc) })
	<-p.donec
}

// totals returns the number of layers, how many were cached and pulled, and
// the bytes received.
func (p *progress) totals() (layers, cached, pulled int, received int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range p.order {
		l := p.layers[d]
		switch l.state {
		case "cached":
			cached++
		case "pulled":
			pulled++
		}
		received += l.done
	}
	return len(p.order), cached, pulled, received
}

// summary is the last line of a pull.
func (p *progress) summary(img *layercache.Image) string {
	n, cached, _, received := p.totals()
	elapsed := time.Since(p.start)
	return fmt.Sprintf("pulled %s@%s: %d layers (%d cached), %s in %.1f s (%s/s)",
		img.Ref, img.Digest, n, cached, megabytes(received), elapsed.Seconds(), megabytes(rate(received, elapsed)))
}

func rate(n int64, d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64(float64(n) / d.Seconds())
}

func (p *progress) redrawLoop() {
	defer close(p.donec)
	t := time.NewTicker(redrawInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			p.redraw()
		case <-p.stopc:
			p.redraw()
			return
		}
	}
}

// redraw rewrites the view in place: it moves the cursor back to the first
// line it drew last time and overwrites every line.
func (p *progress) redraw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.dirty {
		return
	}
	p.dirty = false
	var b strings.Builder
	if p.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dF", p.drawn) // to the start of the first line
	}
	var finished, cached int
	var received, total int64 // compressed bytes received and to fetch
	for _, d := range p.order {
		l := p.layers[d]
		if l.final() {
			finished++
		}
		if l.state == "cached" {
			cached++
		} else {
			total += l.layer.Size
		}
		received += l.done
		var bytes string
		switch l.state {
		case "cached":
			bytes = megabytes(l.layer.Size)
		case "pulled":
			bytes = megabytes(l.layer.Size) + " / " + megabytes(l.layer.Size)
		default:
			bytes = megabytes(l.done) + " / " + megabytes(l.layer.Size)
			if rate, left := l.speed(p.now()); rate != "" {
				bytes += "  " + rate
				if left != "" {
					bytes += "  ETA " + left
				}
			}
		}
		fmt.Fprintf(&b, "\x1b[2K%-21s %-8s %s\n", shortDigest(l.layer.DiffID), l.state, bytes)
	}
	elapsed := time.Since(p.start)
	fmt.Fprintf(&b, "\x1b[2K%d/%d layers (%d cached), %s / %s, %s/s\n", finished, len(p.order), cached,
		megabytes(received), megabytes(total), megabytes(rate(received, elapsed)))
	p.drawn = len(p.order) + 1
	io.WriteString(p.w, b.String())
}
