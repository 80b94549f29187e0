package credentials

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	providerv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
)

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// countingProvider is a provider whose plugin answers with resp (the user
// name is the number of the run) and counts its runs.
func countingProvider(clock *fakeClock, keyType providerv1.PluginCacheKeyType, dur *time.Duration) (*provider, *int) {
	runs := 0
	p := &provider{
		name: "counting", matchImages: []string{"*.registry.io", "registry.io"}, defaultTTL: time.Hour,
		apiVersion: providerv1.SchemeGroupVersion.String(), timeout: time.Minute,
		now: clock.now, cache: map[string]cachedAuth{},
	}
	p.exec = func(context.Context, image, podToken) (*providerv1.CredentialProviderResponse, error) {
		runs++
		resp := &providerv1.CredentialProviderResponse{
			CacheKeyType: keyType,
			Auth: map[string]providerv1.AuthConfig{
				"*.registry.io": {Username: "run" + string(rune('0'+runs)), Password: "pw"},
				"registry.io":   {Username: "run" + string(rune('0'+runs)), Password: "pw"},
			},
		}
		if dur != nil {
			resp.CacheDuration = &metav1.Duration{Duration: *dur}
		}
		return resp, nil
	}
	return p, &runs
}

// TestProviderCache: answers are cached under the key their cacheKeyType
// names (the image, its registry, or every image), for cacheDuration or
// else defaultCacheDuration, and not at all for a zero duration.
func TestProviderCache(t *testing.T) {
	t.Parallel()
	zero, minute := time.Duration(0), time.Minute
	for _, tc := range []struct {
		name    string
		keyType providerv1.PluginCacheKeyType
		dur     *time.Duration
		// the images asked for in turn, and the run that answers each
		images []string
		runs   []int
	}{
		{"Image", providerv1.ImagePluginCacheKeyType, nil,
			[]string{"a.registry.io/x:v1", "a.registry.io/x:v2", "a.registry.io/y", "b.registry.io/x"}, []int{1, 1, 2, 3}},
		{"Registry", providerv1.RegistryPluginCacheKeyType, nil,
			[]string{"a.registry.io/x", "a.registry.io/y", "b.registry.io/x", "b.registry.io/z"}, []int{1, 1, 2, 2}},
		{"Global", providerv1.GlobalPluginCacheKeyType, nil,
			[]string{"a.registry.io/x", "b.registry.io/y", "registry.io/z"}, []int{1, 1, 1}},
		{"zero duration", providerv1.GlobalPluginCacheKeyType, &zero,
			[]string{"a.registry.io/x", "a.registry.io/x"}, []int{1, 2}},
		{"explicit duration", providerv1.GlobalPluginCacheKeyType, &minute,
			[]string{"a.registry.io/x", "a.registry.io/x"}, []int{1, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := &fakeClock{t: time.Unix(1e9, 0)}
			p, _ := countingProvider(clock, tc.keyType, tc.dur)
			for i, ref := range tc.images {
				ring, err := p.keyring(context.Background(), mustImage(t, ref), podToken{})
				if err != nil {
					t.Fatal(err)
				}
				a, ok := ring.lookup(mustImage(t, ref))
				if want := "run" + string(rune('0'+tc.runs[i])); !ok || a.Username != want {
					t.Errorf("%s (#%d): credentials of %q (found %v), want those of %s", ref, i, a.Username, ok, want)
				}
				if a.From != "credential provider counting" {
					t.Errorf("source %q", a.From)
				}
			}
		})
	}
}

// TestProviderCacheExpires: a cached answer expires after its duration.
func TestProviderCacheExpires(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	minute := time.Minute
	p, runs := countingProvider(clock, providerv1.RegistryPluginCacheKeyType, &minute)
	im := mustImage(t, "a.registry.io/x")
	for range 2 {
		if _, err := p.keyring(context.Background(), im, podToken{}); err != nil {
			t.Fatal(err)
		}
	}
	clock.add(59 * time.Second)
	if _, err := p.keyring(context.Background(), im, podToken{}); err != nil || *runs != 1 {
		t.Fatalf("after 59s: %d runs (%v), want 1", *runs, err)
	}
	clock.add(2 * time.Second)
	if _, err := p.keyring(context.Background(), im, podToken{}); err != nil || *runs != 2 {
		t.Fatalf("after 61s: %d runs (%v), want 2", *runs, err)
	}
}

// TestProviderBadCacheKeyType: an answer with an unknown cacheKeyType is
// not used, as in kubelet.
func TestProviderBadCacheKeyType(t *testing.T) {
	t.Parallel()
	p, _ := countingProvider(&fakeClock{}, "Pod", nil)
	_, err := p.keyring(context.Background(), mustImage(t, "a.registry.io/x"), podToken{})
	if err == nil || !strings.Contains(err.Error(), "cacheKeyType") {
		t.Errorf("got %v, want an error naming cacheKeyType", err)
	}
}

// script writes an executable shell script into dir.
func script(t *testing.T, dir, name, body string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// writeConfig writes a kubelet CredentialProviderConfig.
func writeConfig(t *testing.T, dir, body string) string {
	t.Helper()
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const configHead = "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"

// TestProviderExec: real plugins, run with kubelet's protocol: the request
// on stdin, the configured args and env, the answer on stdout; failures,
// timeouts and malformed answers are errors that name the provider.
func TestProviderExec(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	script(t, bin, "good", `read -r req
case "$req" in *'"kind":"CredentialProviderRequest"'*'"image":"registry.io/team/app"'*) ;; *) echo "bad request $req" >&2; exit 3;; esac
echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","auth":{"registry.io":{"username":"'"$1"'","password":"'"$TOKEN"'"}}}'
`)
	script(t, bin, "fails", "echo 'no metadata service' >&2; exit 1\n")
	script(t, bin, "hangs", "sleep 30\n")
	script(t, bin, "garbage", "echo hello\n")
	script(t, bin, "oldversion", `echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1beta1","kind":"CredentialProviderResponse","cacheKeyType":"Image"}'`+"\n")
	cfg := writeConfig(t, t.TempDir(), configHead+`
  - name: good
    matchImages: ["registry.io"]
    defaultCacheDuration: 10m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [robot]
    env: [{name: TOKEN, value: s3cret}]
  - {name: fails, matchImages: ["registry.io"], defaultCacheDuration: 0s, apiVersion: credentialprovider.kubelet.k8s.io/v1}
  - {name: hangs, matchImages: ["registry.io"], defaultCacheDuration: 0s, apiVersion: credentialprovider.kubelet.k8s.io/v1}
  - {name: garbage, matchImages: ["registry.io"], defaultCacheDuration: 0s, apiVersion: credentialprovider.kubelet.k8s.io/v1}
  - {name: oldversion, matchImages: ["registry.io"], defaultCacheDuration: 0s, apiVersion: credentialprovider.kubelet.k8s.io/v1}
`)
	ps, err := loadProviders(cfg, bin, 500*time.Millisecond, false)
	if err != nil {
		t.Fatal(err)
	}
	im := mustImage(t, "registry.io/team/app:v1")
	byName := map[string]*provider{}
	for _, p := range ps {
		byName[p.name] = p
	}
	ring, err := byName["good"].keyring(context.Background(), im, podToken{})
	if err != nil {
		t.Fatal(err)
	}
	if a, ok := ring.lookup(im); !ok || a.Username != "robot" || a.Password != "s3cret" {
		t.Errorf("good: got %+v (found %v), want robot/s3cret from args and env", a, ok)
	}
	for name, want := range map[string]string{
		"fails":      "credential provider fails failed for registry.io/team/app: exit status 1: no metadata service",
		"hangs":      "credential provider hangs did not answer within 500ms",
		"garbage":    "credential provider garbage wrote no valid CredentialProviderResponse",
		"oldversion": "want kind CredentialProviderResponse, apiVersion credentialprovider.kubelet.k8s.io/v1",
	} {
		start := time.Now()
		_, err := byName[name].keyring(context.Background(), im, podToken{})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, want)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s took %v: the timeout did not stop it", name, d)
		}
	}
}

// TestLoadProvidersRejects: a config kubelet would refuse is refused, with
// a message that names the problem.
func TestLoadProvidersRejects(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	script(t, bin, "p", "exit 0\n")
	const ok = `{name: p, matchImages: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1}`
	for _, tc := range []struct{ name, config, binDir, want string }{
		{"wrong kind", "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\nproviders: [" + ok + "]", bin, "want kind CredentialProviderConfig"},
		{"no providers", configHead + "  []", bin, "no providers"},
		{"unknown field", configHead + "  - {name: p, matchImage: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1}", bin, "matchImage"},
		{"duplicate", configHead + "  - " + ok + "\n  - " + ok, bin, "twice"},
		{"slash in name", configHead + "  - {name: ../p, matchImages: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1}", bin, "name"},
		{"no matchImages", configHead + "  - {name: p, defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1}", bin, "matchImages"},
		{"no default duration", configHead + "  - {name: p, matchImages: [r.io], apiVersion: credentialprovider.kubelet.k8s.io/v1}", bin, "defaultCacheDuration"},
		{"old apiVersion", configHead + "  - {name: p, matchImages: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1alpha1}", bin, "apiVersion"},
		{"missing executable", configHead + "  - {name: q, matchImages: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1}", bin, "no executable"},
		{"no bin dir", configHead + "  - " + ok, "", "--image-credential-provider-bin-dir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := loadProviders(writeConfig(t, t.TempDir(), tc.config), tc.binDir, 0, false)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
