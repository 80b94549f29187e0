package credentials

import (
	"encoding/base64"
	"testing"
)

// TestMatchImage: kubelet's matchImages rules, with the examples of its
// CredentialProvider documentation and the cases of its URLsMatch tests.
func TestMatchImage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, pattern, image string
		want                 bool
	}{
		// The documented examples.
		{"ECR account registry", "123456789.dkr.ecr.us-east-1.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/team/app", true},
		{"ECR other account", "123456789.dkr.ecr.us-east-1.amazonaws.com", "987654321.dkr.ecr.us-east-1.amazonaws.com/team/app", false},
		{"azurecr subdomain", "*.azurecr.io", "myregistry.azurecr.io/data", true},
		{"azurecr glob is one part", "*.azurecr.io", "a.b.azurecr.io/data", false},
		{"gcr", "gcr.io", "gcr.io/project/image", true},
		{"gcr is not a subdomain", "gcr.io", "us.gcr.io/project/image", false},
		{"two globs", "*.*.registry.io", "a.b.registry.io/x", true},
		{"two globs, one part", "*.*.registry.io", "b.registry.io/x", false},
		{"port and path", "registry.io:8080/path", "registry.io:8080/path/image", true},
		{"port and path, other port", "registry.io:8080/path", "registry.io:9090/path/image", false},
		{"port and path, no port", "registry.io:8080/path", "registry.io/path/image", false},
		{"port and path, other path", "registry.io:8080/path", "registry.io:8080/other/image", false},
		{"no port in the pattern matches no port only", "registry.io", "registry.io:8080/image", false},
		// kubelet's URLsMatch cases.
		{"glob first part", "*.kubernetes.io", "prefix.kubernetes.io", true},
		{"glob middle part", "prefix.*.io", "prefix.kubernetes.io", true},
		{"glob top-level domain", "prefix.kubernetes.*", "prefix.kubernetes.io", true},
		{"partial glob", "*-good.kubernetes.io", "prefix-good.kubernetes.io", true},
		{"glob and path", "*.kubernetes.io/blah", "prefix.kubernetes.io/blah", true},
		{"path prefix", "prefix.*.io/foo", "prefix.kubernetes.io/foo/bar", true},
		{"glob, port and path", "*.kubernetes.io:1111/blah", "prefix.kubernetes.io:1111/blah", true},
		{"glob needs its part", "*.kubernetes.io", "kubernetes.io", false},
		{"too many globs", "*.*.kubernetes.io", "prefix.kubernetes.io", false},
		{"glob does not cross dots", "*kubernetes.io", "a.kubernetes.io", false},
		{"glob matches empty", "*kubernetes.io", "kubernetes.io", true},
		{"three globs", "*.*.*.kubernetes.io", "a.b.c.kubernetes.io", true},
		{"other domain", "kubernetes.io", "kubernetes.com", false},
		{"partial glob mismatch", "k*.io", "quay.io", false},
		{"other port", "*.kubernetes.io:1234/blah", "prefix.kubernetes.io:1111/blah", false},
		{"port only in the image", "prefix.*.io/foo", "prefix.kubernetes.io:1111/foo/bar", false},
		// Loopback registries, as the tests use them.
		{"loopback", "127.0.0.1:5000", "127.0.0.1:5000/private/data", true},
		{"loopback glob", "127.0.0.*:5000", "127.0.0.1:5000/private/data", true},
		{"loopback other port", "127.0.0.1:5001", "127.0.0.1:5000/private/data", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := matchImage(tc.pattern, tc.image); got != tc.want {
				t.Errorf("matchImage(%q, %q) = %v, want %v", tc.pattern, tc.image, got, tc.want)
			}
		})
	}
}

// TestParseImage: references reduce to the form kubelet passes around.
func TestParseImage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ ref, repo, host, registry string }{
		{"busybox", "docker.io/library/busybox", "docker.io", "index.docker.io"},
		{"docker.io/library/busybox:1.37", "docker.io/library/busybox", "docker.io", "index.docker.io"},
		{"127.0.0.1:5000/private/data:v1", "127.0.0.1:5000/private/data", "127.0.0.1:5000", "127.0.0.1:5000"},
		{"gcr.io/p/i@sha256:" + sixtyFour, "gcr.io/p/i", "gcr.io", "gcr.io"},
	} {
		im, err := parseImage(tc.ref)
		if err != nil {
			t.Fatalf("parseImage(%q): %v", tc.ref, err)
		}
		if im.repo != tc.repo || im.host != tc.host || im.registry != tc.registry {
			t.Errorf("parseImage(%q) = repo %q host %q registry %q, want %q %q %q", tc.ref, im.repo, im.host, im.registry, tc.repo, tc.host, tc.registry)
		}
	}
}

const sixtyFour = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func mustImage(t *testing.T, ref string) image {
	t.Helper()
	im, err := parseImage(ref)
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// TestKeyringOrder: the most specific key wins, a plain key before a
// wildcard one, and Docker Hub's legacy key serves Docker Hub images.
func TestKeyringOrder(t *testing.T) {
	t.Parallel()
	cfg := `{"auths": {
		"registry.io": {"username": "host"},
		"registry.io/team": {"username": "team"},
		"*.registry.io": {"username": "wild"},
		"eu.registry.io": {"username": "eu"},
		"https://index.docker.io/v1/": {"auth": "` + base64.StdEncoding.EncodeToString([]byte("hub:pw")) + `"},
		"https://quay.io/v2/": {"username": "quay", "identitytoken": "tok"}
	}}`
	var k keyring
	if err := k.addDockerConfig([]byte(cfg), false, "test"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ ref, user string }{
		{"registry.io/team/app:v1", "team"},
		{"registry.io/other/app:v1", "host"},
		{"eu.registry.io/app", "eu"},
		{"us.registry.io/app", "wild"},
		{"busybox", "hub"},
		{"docker.io/someone/app", "hub"},
		{"quay.io/org/app", "quay"},
		{"other.io/app", ""},
	} {
		a, ok := k.lookup(mustImage(t, tc.ref))
		if ok != (tc.user != "") || a.Username != tc.user {
			t.Errorf("lookup %s: got %q (found %v), want %q", tc.ref, a.Username, ok, tc.user)
		}
	}
	if a, _ := k.lookup(mustImage(t, "busybox")); a.Password != "pw" {
		t.Errorf("the auth field was not decoded: password %q", a.Password)
	}
	if a, _ := k.lookup(mustImage(t, "quay.io/x")); a.IdentityToken != "tok" {
		t.Errorf("identity token %q, want tok", a.IdentityToken)
	}
}

// TestDockerConfigErrors: a broken docker config is an error, not an empty
// keyring.
func TestDockerConfigErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, data string }{
		{"not JSON", "{"},
		{"auth not base64", `{"auths": {"r.io": {"auth": "%%%"}}}`},
		{"auth without colon", `{"auths": {"r.io": {"auth": "` + base64.StdEncoding.EncodeToString([]byte("user")) + `"}}}`},
	} {
		var k keyring
		if err := k.addDockerConfig([]byte(tc.data), false, "test"); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
