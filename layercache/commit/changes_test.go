package commit

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// makeTree makes the entries in dir, in overlayfs notation, each one of:
//
//	"d/"      a directory             "d/!"   an opaque directory
//	"f=body"  a regular file          "f=>g"  a hardlink to g
//	"l->t"    a symlink to t          "p|"    a FIFO
//	"w-"      a whiteout              "r/@"   a directory with a redirect
func makeTree(t *testing.T, dir string, entries ...string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(dir, 0o755))
	for _, e := range entries {
		p := func(n string) string { return filepath.Join(dir, n) }
		switch {
		case strings.HasSuffix(e, "/!"):
			n := strings.TrimSuffix(e, "/!")
			must(os.MkdirAll(p(n), 0o755))
			must(unix.Setxattr(p(n), xattrOpaque, []byte("y"), 0))
		case strings.HasSuffix(e, "/@"):
			n := strings.TrimSuffix(e, "/@")
			must(os.MkdirAll(p(n), 0o755))
			must(unix.Setxattr(p(n), xattrRedirect, []byte("/elsewhere"), 0))
		case strings.HasSuffix(e, "/"):
			must(os.MkdirAll(p(e), 0o755))
		case strings.Contains(e, "=>"):
			n, target, _ := strings.Cut(e, "=>")
			must(os.Link(p(target), p(n)))
		case strings.Contains(e, "->"):
			n, target, _ := strings.Cut(e, "->")
			must(os.Symlink(target, p(n)))
		case strings.Contains(e, "="):
			n, body, _ := strings.Cut(e, "=")
			must(os.WriteFile(p(n), []byte(body), 0o644))
		case strings.HasSuffix(e, "|"):
			must(unix.Mkfifo(p(strings.TrimSuffix(e, "|")), 0o644))
		case strings.HasSuffix(e, "-"):
			must(unix.Mknod(p(strings.TrimSuffix(e, "-")), unix.S_IFCHR|0o600, 0))
		default:
			t.Fatalf("makeTree: cannot read entry %q", e)
		}
	}
}

// TestChanges: the overlay semantics that a volume's diff depends on, case
// by case, on uppers and layers written in overlayfs notation (the
// end-to-end test, through real mounts, is cmd/strata's TestDiff).
func TestChanges(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name   string
		lowers [][]string // bottom first
		upper  []string
		want   []string // "KIND TYPE SIZE PATH"
		bytes  int64
	}{
		{
			name:   "a whiteout of what no layer has is no change",
			lowers: [][]string{{"a=1"}},
			upper:  []string{"b-"},
		},
		{
			name:   "a whiteout in a middle layer deletes from the view below",
			lowers: [][]string{{"a=1", "b=2"}, {"a-"}},
			upper:  []string{"a=new", "b-"},
			want:   []string{"A file 3 /a", "D file 0 /b"},
			bytes:  3,
		},
		{
			name:   "an opaque directory in a middle layer hides the one below",
			lowers: [][]string{{"d/", "d/x=x", "d/keep=k"}, {"d/!", "d/y=y"}},
			upper:  []string{"d/", "d/x=xx", "d/y=yy"},
			want:   []string{"C dir 0 /d", "A file 2 /d/x", "C file 2 /d/y"},
			bytes:  4,
		},
		{
			name:   "the top-most layer's type wins",
			lowers: [][]string{{"a/", "a/in=1"}, {"a->elsewhere"}},
			upper:  []string{"a/!", "a/in=2"},
			want:   []string{"C dir 0 /a", "A file 1 /a/in"},
			bytes:  1,
		},
		{
			name:   "a directory replaced by a file is one change",
			lowers: [][]string{{"a/", "a/b=1", "a/c/", "a/c/d=1"}},
			upper:  []string{"a=file"},
			want:   []string{"C file 4 /a"},
			bytes:  4,
		},
		{
			name:   "an opaque directory deletes what every layer had there, each top entry once",
			lowers: [][]string{{"d/", "d/x=1", "d/sub/", "d/sub/z=1"}, {"d/", "d/x-", "d/y=2", "d/t=3"}},
			upper:  []string{"d/!", "d/y=22"},
			want:   []string{"C dir 0 /d", "D dir 0 /d/sub", "D file 0 /d/t", "C file 2 /d/y"},
			bytes:  2,
		},
		{
			name:   "a directory made again below an opaque one hides its old content too",
			lowers: [][]string{{"d/", "d/s/", "d/s/old=1", "d/s/kept=1"}},
			upper:  []string{"d/!", "d/s/", "d/s/kept=2"},
			want:   []string{"C dir 0 /d", "C dir 0 /d/s", "C file 1 /d/s/kept", "D file 0 /d/s/old"},
			bytes:  1,
		},
		{
			name:   "special files are listed by stat, hardlinked data counted once",
			lowers: [][]string{{"x=1"}},
			upper:  []string{"a=12345", "b=>a", "l->a", "p|"},
			want:   []string{"A file 5 /a", "A file 5 /b", "A symlink 1 /l", "A fifo 0 /p"},
			bytes:  5,
		},
		{
			name:   "a layer with an opaque root hides the layers below",
			lowers: [][]string{{"a=1"}, {"/!", "b=2"}},
			upper:  []string{"a=3"},
			want:   []string{"A file 1 /a"},
			bytes:  1,
		},
		{
			name:   "paths sort as strings, as docker diff sorts them",
			lowers: [][]string{{"a/"}},
			upper:  []string{"a/", "a/z=1", "a.txt=1", "a-b=1"},
			want:   []string{"C dir 0 /a", "A file 1 /a-b", "A file 1 /a.txt", "A file 1 /a/z"},
			bytes:  3,
		},
		{
			name:   "paths sort as strings at every depth, deletions among them",
			lowers: [][]string{{"a/", "a/b/", "a/b/gone=1", "a/b-d=1"}},
			upper:  []string{"a/", "a/b/!", "a/b/c=1", "a/b.x=1", "a/b-d-", "a/b/c.d/", "a/b/c-e=1"},
			want: []string{"C dir 0 /a", "C dir 0 /a/b", "D file 0 /a/b-d", "A file 1 /a/b.x", "A file 1 /a/b/c",
				"A file 1 /a/b/c-e", "A dir 0 /a/b/c.d", "D file 0 /a/b/gone"},
			bytes: 3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var lowers []string
			for i, l := range tc.lowers {
				ld := filepath.Join(dir, "layer", string(rune('0'+i)))
				makeTree(t, ld, l...)
				lowers = append(lowers, ld)
			}
			upper := filepath.Join(dir, "upper")
			makeTree(t, upper, tc.upper...)
			var changes []Change
			stats, err := Changes(context.Background(), upper, lowers, func(c Change) error {
				changes = append(changes, c)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			var added, changed, deleted int
			for _, c := range changes {
				got = append(got, strings.Join([]string{string(c.Kind), c.Type, strconv.FormatInt(c.Size, 10), c.Path}, " "))
				switch c.Kind {
				case Added:
					added++
				case Changed:
					changed++
				case Deleted:
					deleted++
				}
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("changes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			if want := (ChangeStats{Added: added, Changed: changed, Deleted: deleted, Bytes: tc.bytes}); stats != want {
				t.Errorf("stats = %+v, want %+v", stats, want)
			}
		})
	}
}

// TestChangesRefusesRedirect: an upper written with redirect_dir on holds
// a renamed directory whose content is in a lower: its diff would miss it.
func TestChangesRefusesRedirect(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	makeTree(t, filepath.Join(dir, "l"), "old/", "old/f=1")
	makeTree(t, filepath.Join(dir, "u"), "new/@", "old-")
	_, err := Changes(context.Background(), filepath.Join(dir, "u"), []string{filepath.Join(dir, "l")}, func(Change) error { return nil })
	if !errors.Is(err, ErrOverlayFeature) || !strings.Contains(err.Error(), "redirect_dir") {
		t.Fatalf("Changes of an upper with a redirect: got %v, want ErrOverlayFeature naming redirect_dir", err)
	}
}

// TestChangesStopsOnEmitError: an error of emit (a closed pipe) ends the
// walk and comes back.
func TestChangesStopsOnEmitError(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	makeTree(t, filepath.Join(dir, "l"), "a=1")
	makeTree(t, filepath.Join(dir, "u"), "b=1", "c=1", "d/", "d/e=1")
	stop := errors.New("stop")
	n := 0
	_, err := Changes(context.Background(), filepath.Join(dir, "u"), []string{filepath.Join(dir, "l")}, func(Change) error {
		n++
		return stop
	})
	if !errors.Is(err, stop) || n != 1 {
		t.Fatalf("Changes with a failing emit: err %v after %d calls, want %v after 1", err, n, stop)
	}
}
