package layercache

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// manifestCounter counts a registry's manifest requests by method, and
// holds them until released, so that concurrent callers are sure to meet.
type manifestCounter struct {
	mu    sync.Mutex
	count map[string]int
	gate  chan struct{}
}

func (m *manifestCounter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/manifests/") {
			m.mu.Lock()
			m.count[r.Method]++
			gate := m.gate
			m.mu.Unlock()
			if gate != nil {
				<-gate
			}
		}
		next.ServeHTTP(w, r)
	})
}

func (m *manifestCounter) take() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.count
	m.count = map[string]int{}
	return c
}

// TestConcurrentResolvesShareOneRequest: callers that resolve one tag at
// the same time with the same credentials share one manifest GET; callers
// with other credentials never share theirs: a tenant whose password is
// wrong is refused though a resolution with the right one is in flight.
func TestConcurrentResolvesShareOneRequest(t *testing.T) {
	s := openStore(t, t.TempDir())
	mc := &manifestCounter{count: map[string]int{}}
	auth := testimage.BasicAuthUsers(map[string]string{"bob": "hunter2", "carol": "pa55"})
	reg := testimage.Server(t, func(next http.Handler) http.Handler { return mc.wrap(auth(next)) })
	ref := reg + "/team/ds:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
	mc.take()

	mc.mu.Lock()
	mc.gate = make(chan struct{})
	mc.mu.Unlock()
	type caller struct {
		kc   authn.Keychain
		want bool
	}
	var callers []caller
	for range 10 {
		callers = append(callers, caller{basicFor(reg, "bob", "hunter2"), true})
	}
	callers = append(callers, caller{basicFor(reg, "carol", "pa55"), true}, caller{basicFor(reg, "mallory", "guess"), false})
	errs := make([]error, len(callers))
	var wg sync.WaitGroup
	for i, c := range callers {
		wg.Go(func() { _, errs[i] = s.Resolve(context.Background(), ref, PullOptions{Keychain: c.kc}) })
	}
	// Let the callers gather behind the held requests, then answer.
	waitFor(t, func() bool { mc.mu.Lock(); defer mc.mu.Unlock(); return mc.count[http.MethodGet] >= 2 })
	mc.mu.Lock()
	close(mc.gate)
	mc.gate = nil
	mc.mu.Unlock()
	wg.Wait()
	for i, c := range callers {
		switch {
		case c.want && errs[i] != nil:
			t.Errorf("caller %d: %v", i, errs[i])
		case !c.want && !errors.Is(errs[i], ErrUnauthorized):
			t.Errorf("caller %d with a wrong password: err %v, want ErrUnauthorized", i, errs[i])
		}
	}
	// bob's ten share one GET; carol asks on her own, and mallory is
	// refused by the registry, at her own GET or her own access check.
	if got := mc.take(); got[http.MethodGet] > 3 || got[http.MethodGet] < 2 {
		t.Errorf("manifest requests %v: want bob's ten callers to share one GET, carol her own, mallory at most hers", got)
	}
}

// TestAlwaysConfirmsTagByHead: under PullAlways a cached tag is confirmed
// by a HEAD of its manifest, which registries do not count as a pull, and
// the manifest is fetched only when the tag moved.
func TestAlwaysConfirmsTagByHead(t *testing.T) {
	s := openStore(t, t.TempDir())
	mc := &manifestCounter{count: map[string]int{}}
	reg := testimage.Server(t, mc.wrap)
	ref := reg + "/ds:v1"
	first := testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	ctx := context.Background()
	if _, err := s.Pull(ctx, ref, PullOptions{}); err != nil {
		t.Fatal(err)
	}
	mc.take()

	img, err := s.Resolve(ctx, ref, PullOptions{Policy: PullAlways})
	if err != nil || img.Digest != first {
		t.Fatalf("Always of an unchanged tag: %v, digest %v, want %s", err, img, first)
	}
	if got := mc.take(); got[http.MethodHead] != 1 || got[http.MethodGet] != 0 {
		t.Errorf("Always of an unchanged tag asked %v; want one HEAD and no GET", got)
	}

	moved := testimage.Push(t, ref, sampleImage(t, testimage.Zstd))
	if moved == first {
		t.Fatal("the new image has the old digest")
	}
	mc.take()
	img, err = s.Resolve(ctx, ref, PullOptions{Policy: PullAlways})
	if err != nil || img.Digest != moved {
		t.Fatalf("Always of a moved tag: %v, %v; want digest %s", err, img, moved)
	}
	if got := mc.take(); got[http.MethodHead] != 1 || got[http.MethodGet] != 1 {
		t.Errorf("Always of a moved tag asked %v; want one HEAD and one GET", got)
	}
	// IfNotPresent asks nothing of a cached tag.
	if _, err := s.Resolve(ctx, ref, PullOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := mc.take(); len(got) != 0 {
		t.Errorf("IfNotPresent of a cached tag asked %v", got)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
