package engine

import (
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// testStack builds a stack of images from layer names, bottom image first,
// each image's layers bottom first.
func testStack(images ...[]string) []stackedImage {
	var out []stackedImage
	for i, names := range images {
		img := &layercache.Image{Ref: "r/img" + string(rune('a'+i))}
		for _, n := range names {
			img.Layers = append(img.Layers, layercache.Layer{DiffID: hashOf(n)})
		}
		out = append(out, stackedImage{img: img})
	}
	return out
}

func hashOf(name string) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: strings.Repeat(name, 64/len(name))}
}

func names(ids []v1.Hash) string {
	var out []string
	for _, id := range ids {
		out = append(out, id.Hex[:1])
	}
	return strings.Join(out, "")
}

// TestStackLayers: a layer that appears more than once in a stack is
// mounted once, at its topmost place; the order is otherwise the stack's.
func TestStackLayers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		images [][]string
		want   string // bottom first
	}{
		{"one image", [][]string{{"a", "b", "c"}}, "abc"},
		{"two images", [][]string{{"a", "b"}, {"c", "d"}}, "abcd"},
		{"shared base", [][]string{{"a", "b"}, {"a", "c"}}, "bac"},
		{"one image repeats a layer", [][]string{{"e", "a", "e", "b"}}, "aeb"},
		{"the same image twice", [][]string{{"a", "b"}, {"a", "b"}}, "ab"},
		{"upper image inside the lower", [][]string{{"a", "b", "c"}, {"b"}}, "acb"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := names(stackLayers(testStack(tc.images...))); got != tc.want {
				t.Errorf("stackLayers(%v) = %s, want %s", tc.images, got, tc.want)
			}
		})
	}
}

// TestFetchPlan: each layer is fetched once, by the lowest image that has
// it; an image with nothing of its own is left out.
func TestFetchPlan(t *testing.T) {
	stack := testStack([]string{"a", "b"}, []string{"a", "c"}, []string{"b"})
	orig := slices.Clone(stack[1].img.Layers)
	plan := fetchPlan(stack)
	var got []string
	for _, p := range plan {
		var ids []v1.Hash
		for _, l := range p.img.Layers {
			ids = append(ids, l.DiffID)
		}
		got = append(got, p.img.Ref+":"+names(ids))
	}
	if want := "r/imga:ab r/imgb:c"; strings.Join(got, " ") != want {
		t.Errorf("fetchPlan = %v, want %s", got, want)
	}
	if !slices.Equal(stack[1].img.Layers, orig) {
		t.Error("fetchPlan changed an image's own layer list")
	}
}

func TestCheckDepth(t *testing.T) {
	if err := checkDepth([]string{"r/a", "r/b"}, 500); err != nil {
		t.Errorf("500 layers: %v", err)
	}
	err := checkDepth([]string{"r/a:v1", "r/b:v1"}, 550)
	if fault.Of(err) != fault.Invalid {
		t.Fatalf("550 layers: %v, want InvalidArgument", err)
	}
	for _, w := range []string{"the stack of 2 images has 550 layers; overlayfs stacks at most 500", "r/a:v1", "r/b:v1"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%q does not say %q", err, w)
		}
	}
	if err := checkDepth([]string{"r/a:v1"}, 501); err == nil || !strings.Contains(err.Error(), "image r/a:v1 has 501 layers") {
		t.Errorf("one image of 501 layers: %v", err)
	}
}
