package layercache

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// privateImage pushes sampleImage to a registry that wants bob's password,
// pulls it into s with bob's secret, and returns the registry, the tag, the
// image's digest, its layers' blob digests and diffIDs, and bob's secret.
type privateFixture struct {
	reg, tag         string
	digest           v1.Hash
	digests, diffIDs []v1.Hash
	bob              authn.Keychain
	spy              *spy
}

func pullPrivate(t *testing.T, s *Store) privateFixture {
	t.Helper()
	f := privateFixture{spy: newSpy()}
	auth := testimage.BasicAuth("bob", "hunter2")
	f.reg = testimage.Server(t, func(next http.Handler) http.Handler { return f.spy.wrap(auth(next)) })
	f.tag = f.reg + "/team-b/ds:v1"
	img := sampleImage(t, testimage.Gzip)
	f.digest = testimage.Push(t, f.tag, img, remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	f.bob = basicFor(f.reg, "bob", "hunter2")
	pulled, err := s.Pull(context.Background(), f.tag, PullOptions{Keychain: f.bob})
	if err != nil {
		t.Fatalf("tenant B pulls its private image: %v", err)
	}
	for _, l := range pulled.Layers {
		f.digests = append(f.digests, l.Digest)
		f.diffIDs = append(f.diffIDs, l.DiffID)
	}
	return f
}

// A registry can lie: any tenant can run one that answers 200 to every HEAD.
// None of these requests, which name tenant B's private content on a
// registry that does not hold its bytes, may get it from the cache.
func TestHostileRegistryCannotClaimCachedPrivateContent(t *testing.T) {
	s := openStore(t, t.TempDir())
	b := pullPrivate(t, s)
	liar := testimage.Server(t, testimage.Liar)
	ctx := context.Background()

	made := []v1.Hash{testimage.MadeUpDigest(t, "1"), testimage.MadeUpDigest(t, "2")}
	testimage.Push(t, liar+"/x/forged:b-digests", testimage.ForgedImage(t, b.digests, b.diffIDs))
	testimage.Push(t, liar+"/x/forged:made-up", testimage.ForgedImage(t, made, b.diffIDs))
	// The manifest is no secret (a digest may leak through a PV's spec):
	// even with its very bytes, the layers stay out of reach.
	leaked := testimage.Push(t, liar+"/x/leaked:v1", testimage.ForgedImage(t, b.digests, b.diffIDs))

	for _, tc := range []struct {
		name   string
		ref    string
		policy PullPolicy
	}{
		{"the digest trick", liar + "/x/y@" + b.digest.String(), PullIfNotPresent},
		{"the digest trick, Always", liar + "/x/y@" + b.digest.String(), PullAlways},
		{"the digest trick, Never", liar + "/x/y@" + b.digest.String(), PullNever},
		{"the digest trick on B's registry, no secret", b.reg + "/team-b/ds@" + b.digest.String(), PullIfNotPresent},
		{"forged diffIDs with B's blob digests", liar + "/x/forged:b-digests", PullIfNotPresent},
		{"forged diffIDs with made-up blob digests", liar + "/x/forged:made-up", PullIfNotPresent},
		{"B's manifest bytes, leaked", liar + "/x/leaked@" + leaked.String(), PullIfNotPresent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := s.Pull(ctx, tc.ref, PullOptions{Policy: tc.policy})
			if err == nil {
				t.Fatalf("Pull(%s) = %d layers, nil: B's private layers %v served to a request that never proved access",
					tc.ref, len(img.Layers), img.DiffIDs())
			}
			if !errors.Is(err, ErrUnauthorized) {
				t.Fatalf("Pull(%s) = %v, want ErrUnauthorized", tc.ref, err)
			}
			t.Logf("refused: %v", err)
		})
	}

	// Tenant B is untouched: its own repository and secret work offline.
	b.spy.set(func(s *spy) { s.down = true })
	if _, err := s.Pull(ctx, b.tag, PullOptions{Keychain: b.bob, Policy: PullNever}); err != nil {
		t.Fatalf("tenant B, its own secret, Never, registry down: %v", err)
	}
}

// Content first obtained without credentials is public: another repository
// that names it gets it from the cache without serving its bytes. But a
// diffID is trusted only with a blob digest that was seen to produce it.
func TestPublicLayersStayShareable(t *testing.T) {
	s := openStore(t, t.TempDir())
	pub := newSpy()
	reg := testimage.Server(t, pub.wrap)
	img := sampleImage(t, testimage.Gzip)
	testimage.Push(t, reg+"/public/ds:v1", img)
	pulled, err := s.Pull(context.Background(), reg+"/public/ds:v1", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var digests, diffIDs []v1.Hash
	for _, l := range pulled.Layers {
		digests, diffIDs = append(digests, l.Digest), append(diffIDs, l.DiffID)
	}
	liar := testimage.Server(t, testimage.Liar)
	testimage.Push(t, liar+"/x/copy:v1", testimage.ForgedImage(t, digests, diffIDs))
	if _, err := s.Pull(context.Background(), liar+"/x/copy:v1", PullOptions{}); err != nil {
		t.Errorf("a public layer, named with the blob digest that produced it: %v", err)
	}
	made := []v1.Hash{testimage.MadeUpDigest(t, "1"), testimage.MadeUpDigest(t, "2")}
	testimage.Push(t, liar+"/x/made-up:v1", testimage.ForgedImage(t, made, diffIDs))
	if _, err := s.Pull(context.Background(), liar+"/x/made-up:v1", PullOptions{}); err == nil {
		t.Error("a public diffID named with a blob digest nobody saw produce it was served from the cache")
	}
}

// Another repository that really holds the content (the same dataset
// pushed twice, or a cross-repository mount) earns it by serving the bytes
// once per layer; then it is on record, offline too, across a restart.
func TestAnotherRepositoryEarnsPrivateLayersByServingThem(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root)
	b := pullPrivate(t, s)
	copyTag := b.reg + "/team-b/copy:v1"
	testimage.Push(t, copyTag, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	before := make([]int, len(b.digests))
	for i, d := range b.digests {
		before[i] = b.spy.count(d)
	}
	if _, err := s.Pull(context.Background(), copyTag, PullOptions{Keychain: b.bob}); err != nil {
		t.Fatalf("a second repository that holds the layers: %v", err)
	}
	for i, d := range b.digests {
		if got := b.spy.count(d) - before[i]; got != 1 {
			t.Errorf("layer %s was downloaded %d times to prove the second repository holds it, want 1", d, got)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, root)
	b.spy.set(func(s *spy) { s.down = true })
	if _, err := s.Pull(context.Background(), copyTag, PullOptions{Keychain: b.bob, Policy: PullNever}); err != nil {
		t.Fatalf("the second repository, on record, Never, registry down, after a restart: %v", err)
	}
}

// A caller that names a private layer while its owner's fetch is in flight
// must not get it by joining that fetch.
func TestJoiningAFetchGrantsNoAccess(t *testing.T) {
	s := openStore(t, t.TempDir())
	sp := newSpy()
	auth := testimage.BasicAuth("bob", "hunter2")
	reg := testimage.Server(t, func(next http.Handler) http.Handler { return sp.wrap(auth(next)) })
	img := sampleImage(t, testimage.Gzip)
	tag := reg + "/team-b/ds:v1"
	testimage.Push(t, tag, img, remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	bob := basicFor(reg, "bob", "hunter2")
	digests := layerDigests(t, img)
	var diffIDs []v1.Hash
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		id, err := l.DiffID()
		if err != nil {
			t.Fatal(err)
		}
		diffIDs = append(diffIDs, id)
	}
	liar := testimage.Server(t, testimage.Liar)
	testimage.Push(t, liar+"/x/forged:v1", testimage.ForgedImage(t, digests, diffIDs))

	// 300 ms per 64 KiB: bob's fetch is still in flight when the attacker
	// names the same layers.
	sp.set(func(s *spy) { s.delay = 300 * time.Millisecond })
	bobDone := make(chan error, 1)
	go func() {
		_, err := s.Pull(context.Background(), tag, PullOptions{Keychain: bob})
		bobDone <- err
	}()
	// Wait until bob's fetch is in flight, then join it.
	for {
		s.mu.Lock()
		n := len(s.flights)
		s.mu.Unlock()
		if n > 0 {
			break
		}
		select {
		case err := <-bobDone:
			t.Fatalf("bob's pull ended before the attacker could join it: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	_, err = s.Pull(context.Background(), liar+"/x/forged:v1", PullOptions{})
	if err == nil {
		t.Fatal("the attacker got B's layers by joining B's fetch")
	}
	// It fetched the layers from its own repository, which has no bytes,
	// or found them committed and was refused.
	if !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrUnauthorized) {
		t.Errorf("attacker's pull = %v, want ErrNotFound or ErrUnauthorized", err)
	}
	if err := <-bobDone; err != nil {
		t.Fatalf("bob's pull failed: %v", err)
	}
}
