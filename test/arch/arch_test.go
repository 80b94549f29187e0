// Package arch keeps docs/architecture.md honest: the imports between the
// module's packages, as go list reports them, are exactly the arrows the
// page lists, and every arrow points down its layers.
package arch

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/strata-csi/strata"

// repoRoot is the module's root, two directories above this file.
func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot find the test's source file")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// fence returns the lines of the fenced block of docs/architecture.md
// whose info string is name.
func fence(t *testing.T, doc, name string) []string {
	t.Helper()
	f, err := os.Open(doc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []string
	in, found := false, false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case !in && strings.TrimSpace(line) == "```"+name:
			in, found = true, true
		case in && strings.TrimSpace(line) == "```":
			in = false
		case in && strings.TrimSpace(line) != "":
			lines = append(lines, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if !found {
		t.Fatalf("%s has no ```%s block", doc, name)
	}
	return lines
}

// docMap is what the page says: each package's layer, and its arrows.
type docMap struct {
	layer  map[string]int
	arrows map[string][]string
}

func readDoc(t *testing.T, doc string) docMap {
	t.Helper()
	m := docMap{layer: map[string]int{}, arrows: map[string][]string{}}
	for _, line := range fence(t, doc, "layers") {
		fields := strings.Fields(line)
		n, err := strconv.Atoi(fields[0])
		if err != nil {
			t.Fatalf("layers line %q does not start with its number", line)
		}
		for _, p := range fields[1:] {
			if _, dup := m.layer[p]; dup {
				t.Errorf("%s is in two layers", p)
			}
			m.layer[p] = n
		}
	}
	for _, line := range fence(t, doc, "arrows") {
		from, to, ok := strings.Cut(line, "->")
		if !ok {
			t.Fatalf("arrows line %q has no ->", line)
		}
		from = strings.TrimSpace(from)
		if _, dup := m.arrows[from]; dup {
			t.Errorf("%s has two arrows lines", from)
		}
		m.arrows[from] = []string{}
		for _, p := range strings.Split(to, ",") {
			if p = strings.TrimSpace(p); p != "" {
				m.arrows[from] = append(m.arrows[from], p)
			}
		}
	}
	return m
}

// pkg is what go list -json says of one package.
type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// listPackages returns the module's own packages (hack and test
// excluded: tools and suites), by path relative to the module.
func listPackages(t *testing.T, root string) map[string]pkg {
	t.Helper()
	pkgs := map[string]pkg{}
	for _, p := range goList(t, root, "./...") {
		rel := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, module), "/")
		if strings.HasPrefix(rel, "hack/") || strings.HasPrefix(rel, "test/") {
			continue
		}
		pkgs[rel] = p
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages of the module", len(pkgs))
	}
	return pkgs
}

// ours returns the module's packages among paths, relative to the module.
func ours(paths []string) []string {
	var out []string
	for _, p := range paths {
		if rel, ok := strings.CutPrefix(p, module+"/"); ok {
			out = append(out, rel)
		}
	}
	slices.Sort(out)
	return out
}

// TestPackageMap: every package is on the map, its imports are exactly its
// arrows, and every arrow points to a lower layer.
func TestPackageMap(t *testing.T) {
	root := repoRoot(t)
	doc := readDoc(t, filepath.Join(root, "docs", "architecture.md"))
	pkgs := listPackages(t, root)
	for path, p := range pkgs {
		want, listed := doc.arrows[path]
		if !listed {
			t.Errorf("package %s is not on the map (docs/architecture.md): add its layer and its arrows", path)
			continue
		}
		if _, ok := doc.layer[path]; !ok {
			t.Errorf("package %s has arrows but no layer", path)
		}
		got := ours(p.Imports)
		for _, imp := range got {
			if !slices.Contains(want, imp) {
				t.Errorf("%s imports %s, which the map has no arrow for: an upward or sideways import, or a new one to draw", path, imp)
			}
		}
		for _, w := range want {
			if !slices.Contains(got, w) {
				t.Errorf("the map has an arrow %s -> %s that the code no longer has", path, w)
			}
		}
	}
	for from, tos := range doc.arrows {
		if _, ok := pkgs[from]; !ok {
			t.Errorf("the map lists %s, which is no package of the module", from)
		}
		for _, to := range tos {
			lf, okf := doc.layer[from]
			lt, okt := doc.layer[to]
			if !okf || !okt {
				t.Errorf("arrow %s -> %s: a package without a layer", from, to)
				continue
			}
			if lt <= lf {
				t.Errorf("arrow %s (layer %d) -> %s (layer %d) does not point down", from, lf, to, lt)
			}
		}
	}
}

// TestLayerCacheKnowsNoDriver: the layer cache imports nothing of the
// driver, directly or through another package.
func TestLayerCacheKnowsNoDriver(t *testing.T) {
	pkgs := goList(t, repoRoot(t), "./layercache/...")
	if len(pkgs) == 0 {
		t.Fatal("go list found no layercache packages")
	}
	for _, p := range pkgs {
		for _, d := range ours(p.Deps) {
			if strings.HasPrefix(d, "driver") || strings.HasPrefix(d, "cmd") {
				t.Errorf("%s depends on %s", p.ImportPath, d)
			}
		}
	}
}

// goList runs go list -json on pattern in the module at root: each
// package with its imports and all its dependencies.
func goList(t *testing.T, root, pattern string) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", pattern)
	cmd.Dir = root
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %s: %v", pattern, err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatal(fmt.Errorf("go list %s: %w", pattern, err))
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// TestFrontIsThin: every file of the CSI front (package driver, tests
// aside) is under 300 lines; the work lives in the packages below it.
func TestFrontIsThin(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "driver", "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no files in driver/: %v", err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), "\n"); n >= 300 {
			t.Errorf("%s has %d lines: the front's files stay under 300 (move the work into the package that owns its flow)", filepath.Base(f), n)
		}
	}
}
