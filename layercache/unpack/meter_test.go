package unpack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

var errFull = errors.New("test meter full")

// entryCost is what limitMeter charges for an entry.
const entryCost = 4096

// limitMeter refuses charges past limit, and counts what it accepted.
type limitMeter struct {
	limit, used    int64
	entries, bytes int64
}

func (m *limitMeter) charge(n int64) error {
	if m.used+n > m.limit {
		return errFull
	}
	m.used += n
	return nil
}

func (m *limitMeter) Entry() error {
	m.entries++
	return m.charge(entryCost)
}

func (m *limitMeter) Content(n int64) error {
	m.bytes += n
	return m.charge(n)
}

// blocks is what the tree under dir takes on disk.
func blocks(t *testing.T, dir string) int64 {
	t.Helper()
	var total int64
	must(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		total += info.Sys().(*syscall.Stat_t).Blocks * 512
		return nil
	}))
	return total
}

// TestMeterStopsEarly: the meter is asked before content is written, so a
// file bigger than the meter allows stops after what it allowed, with the
// meter's error, and a million-entry layer pays per entry.
func TestMeterStopsEarly(t *testing.T) {
	requireRoot(t)
	big := strings.Repeat("x", 8<<20)
	for _, tc := range []struct {
		name    string
		entries []ent
		limit   int64
	}{
		{"big file", []ent{dir("d/"), file("d/big", big)}, 2 << 20},
		{"many empty files", func() []ent {
			var es []ent
			for i := range 1000 {
				es = append(es, file(fmt.Sprintf("f%d", i), ""))
			}
			return es
		}(), 100 * entryCost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSandbox(t, t.TempDir())
			m := &limitMeter{limit: tc.limit}
			_, err := Apply(context.Background(), s.layer, bytes.NewReader(makeTar(t, tc.entries...)), WithMeter(m))
			if !errors.Is(err, errFull) {
				t.Fatalf("Apply over the meter's limit = %v, want the meter's error", err)
			}
			if m.used > tc.limit {
				t.Errorf("meter accepted %d bytes, over its limit %d", m.used, tc.limit)
			}
			if du := blocks(t, s.layer); du > tc.limit+1<<20 {
				t.Errorf("layer takes %d bytes on disk, want at most about the limit %d", du, tc.limit)
			}
		})
	}
}

// TestMeterChargesAddUp: a complete unpack tells the meter of every entry
// and of exactly its content bytes, sparse files at their full length.
func TestMeterChargesAddUp(t *testing.T) {
	requireRoot(t)
	m := &limitMeter{limit: 1 << 40}
	s := newSandbox(t, t.TempDir())
	entries := []ent{dir("a/"), file("a/f", "hello"), file("a/zeros", string(make([]byte, 3<<20))), symlink("a/l", "f"), hardlink("a/h", "a/f"), file(".wh.gone", "")}
	st, err := Apply(context.Background(), s.layer, bytes.NewReader(makeTar(t, entries...)), WithMeter(m))
	if err != nil {
		t.Fatal(err)
	}
	if m.entries != st.Entries || m.bytes != st.Bytes {
		t.Errorf("meter told of %d entries and %d bytes, want the stats' %d and %d", m.entries, m.bytes, st.Entries, st.Bytes)
	}
	if m.entries != 6 || m.bytes != 5+3<<20 {
		t.Errorf("meter told of %d entries and %d bytes, want 6 and %d", m.entries, m.bytes, 5+3<<20)
	}
}
