package csitest

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// The hostile-tenant suite, cache part (docs/security.md): tenant B's
// private image is in the node's cache; tenant A runs a registry that
// answers 200 to every HEAD and tries to mount B's layers through it, with
// every trick that worked before, through the real plugin. Each is
// PermissionDenied, nothing is mounted, and B keeps working.
func TestHostileTenantCannotMountCachedPrivateLayers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg, ref := privateImage(t)
	secret := pullSecret(reg, privUser, privPass)
	b := e.privReq("tenant-b", ref, secret)
	e.publish(b)
	if got := readString(t, filepath.Join(b.TargetPath, "data.txt")); got != "private\n" {
		t.Fatalf("tenant B reads %q", got)
	}

	// What B's image is made of, as anyone who saw its digest could learn.
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithAuth(&authn.Basic{Username: privUser, Password: privPass}))
	if err != nil {
		t.Fatal(err)
	}
	digest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	var digests, diffIDs []v1.Hash
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		id, _ := l.DiffID()
		digests, diffIDs = append(digests, d), append(diffIDs, id)
	}

	liar := testimage.Server(t, testimage.Liar)
	testimage.Push(t, liar+"/a/forged:b-digests", testimage.ForgedImage(t, digests, diffIDs))
	testimage.Push(t, liar+"/a/forged:made-up", testimage.ForgedImage(t, []v1.Hash{testimage.MadeUpDigest(t, "x")}, diffIDs))
	public := testimage.Registry(t) + "/public/base:v1"
	testimage.Push(t, public, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("base.txt", "public\n")), testimage.Gzip)))

	for _, tc := range []struct {
		name  string
		attrs map[string]string
		words []string
	}{
		{"the digest trick", map[string]string{"image": liar + "/a/x@" + digest.String()},
			[]string{"registry refused access", "did not serve it"}},
		{"the digest trick, Never", map[string]string{"image": liar + "/a/x@" + digest.String(), "pullPolicy": "Never"},
			[]string{"registry refused access", "Never"}},
		{"the digest trick on B's own registry, no secret", map[string]string{"image": reg + "/private/data@" + digest.String()},
			[]string{"registry refused access"}},
		{"forged diffIDs with B's blob digests", map[string]string{"image": liar + "/a/forged:b-digests"},
			[]string{"registry refused access", "did not serve its blob"}},
		{"forged diffIDs with made-up blob digests", map[string]string{"image": liar + "/a/forged:made-up"},
			[]string{"registry refused access", "did not serve its blob"}},
		{"a forged image stacked over a public one", map[string]string{"image": public, "stackImages": liar + "/a/forged:b-digests"},
			[]string{"registry refused access", "did not serve its blob"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vol := "tenant-a-" + strings.ReplaceAll(t.Name()[strings.LastIndex(t.Name(), "/")+1:], "'", "")
			req := pubReq(vol, e.target(vol), tc.attrs)
			_, err := e.Node.NodePublishVolume(ctx(t), req)
			wantCode(t, err, codes.PermissionDenied, tc.words...)
			if n := mountCount(t, req.TargetPath); n != 0 {
				t.Errorf("%d mounts at tenant A's target after the refusal", n)
			}
		})
	}

	// B's volume still reads, and a second pod of B publishes from the
	// cache.
	if got := readString(t, filepath.Join(b.TargetPath, "data.txt")); got != "private\n" {
		t.Errorf("tenant B's first volume reads %q", got)
	}
	b2 := e.privReq("tenant-b-2", ref, secret)
	e.publish(b2)
	for _, r := range []string{"tenant-b", "tenant-b-2"} {
		if err := e.unpublish(r, e.target(r)); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}
