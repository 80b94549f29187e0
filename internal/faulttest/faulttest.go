// Package faulttest checks, in the tests of a domain package, that every
// sentinel error the package declares has the fault.Kind its boundaries
// expect.
package faulttest

import (
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/strata-csi/strata/internal/fault"
)

// Sentinels returns the names of the package-level variables named Err* in
// the non-test Go files of dir.
func Sentinels(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatalf("parse %s: %v", f, err)
		}
		for _, d := range af.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, s := range gd.Specs {
				for _, n := range s.(*ast.ValueSpec).Names {
					if strings.HasPrefix(n.Name, "Err") {
						names = append(names, n.Name)
					}
				}
			}
		}
	}
	if len(names) == 0 {
		t.Fatalf("no Err* variables in %s: is the directory right?", dir)
	}
	sort.Strings(names)
	return names
}

// Want is a sentinel's expected kind.
type Want struct {
	Err  error
	Kind fault.Kind
}

// CheckKinds fails t unless every sentinel declared in dir is in want, and
// fault.Of classifies each of want, bare and wrapped, as its kind. A
// sentinel added to the package without a kind, or without an entry here,
// fails.
func CheckKinds(t *testing.T, dir string, want map[string]Want) {
	t.Helper()
	for _, name := range Sentinels(t, dir) {
		if _, ok := want[name]; !ok {
			t.Errorf("%s is declared in %s but has no expected kind in this test: give it one (fault.New) and list it", name, dir)
		}
	}
	for name, w := range want {
		if w.Err == nil {
			t.Errorf("%s: nil error", name)
			continue
		}
		if w.Kind == fault.Internal {
			t.Errorf("%s: a sentinel of kind Internal is no better than errors.New", name)
		}
		if got := fault.Of(w.Err); got != w.Kind {
			t.Errorf("fault.Of(%s) = %v, want %v", name, got, w.Kind)
		}
		wrapped := errors.Join(errors.New("context"), errors.New("outer: "+w.Err.Error()), wrap(w.Err))
		if got := fault.Of(wrapped); got != w.Kind {
			t.Errorf("fault.Of(wrapped %s) = %v, want %v", name, got, w.Kind)
		}
	}
}

type wrapErr struct{ err error }

func (e wrapErr) Error() string { return "wrapped: " + e.err.Error() }
func (e wrapErr) Unwrap() error { return e.err }

func wrap(err error) error { return wrapErr{err} }
