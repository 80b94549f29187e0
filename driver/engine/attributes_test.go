package engine

import (
	"reflect"
	"strings"
	"testing"

	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

const tokensJSON = `{"registry.io":{"token":"eyJ-secret-token","expirationTimestamp":"2030-01-01T00:00:00Z"},"":{"token":"default-aud-token","expirationTimestamp":"2030-01-01T00:00:00Z"}}`

func TestParseAttributes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		attrs   map[string]string
		want    Attributes
		wantErr string
	}{
		{"image only", map[string]string{"image": "r/x:v1"}, Attributes{Image: "r/x:v1", PullPolicy: layercache.PullIfNotPresent}, ""},
		{"all", map[string]string{"image": "r/x:v1", "pullPolicy": "Never", "subPath": "data/raw/"},
			Attributes{Image: "r/x:v1", PullPolicy: layercache.PullNever, SubPath: "data/raw"}, ""},
		{"subPath cannot climb out", map[string]string{"image": "r/x", "subPath": "../../etc"},
			Attributes{Image: "r/x", PullPolicy: layercache.PullIfNotPresent, SubPath: "etc"}, ""},
		{"kubelet keys are accepted", map[string]string{"image": "r/x", "csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/ephemeral": "true"},
			Attributes{Image: "r/x", PullPolicy: layercache.PullIfNotPresent}, ""},
		{"missing image", map[string]string{"pullPolicy": "Always"}, Attributes{}, `volume attribute "image" is required`},
		{"unknown key named", map[string]string{"image": "r/x", "pullpolicy": "Always"}, Attributes{}, `unknown volume attribute "pullpolicy"`},
		{"bad policy", map[string]string{"image": "r/x", "pullPolicy": "Sometimes"}, Attributes{}, `unknown pull policy "Sometimes"`},
		{"stack of one line", map[string]string{"image": "r/ds:v1", "stackImages": "r/tools:v1, r/extra@sha256:" + strings.Repeat("a", 64)},
			Attributes{Image: "r/ds:v1", StackImages: []string{"r/tools:v1", "r/extra@sha256:" + strings.Repeat("a", 64)}, PullPolicy: layercache.PullIfNotPresent}, ""},
		{"stack of a YAML block", map[string]string{"image": "r/ds:v1", "stackImages": "r/tools:v1\nr/extra:v2\n"},
			Attributes{Image: "r/ds:v1", StackImages: []string{"r/tools:v1", "r/extra:v2"}, PullPolicy: layercache.PullIfNotPresent}, ""},
		{"empty stack", map[string]string{"image": "r/ds:v1", "stackImages": " , "}, Attributes{}, "stackImages is empty"},
		{"malformed stacked image", map[string]string{"image": "r/ds:v1", "stackImages": "r/tools:v1,UPPER/Case::x"}, Attributes{},
			`volume attribute stackImages: invalid image reference "UPPER/Case::x"`},
		{"malformed image", map[string]string{"image": "r/ds::v1"}, Attributes{}, `volume attribute image: invalid image reference "r/ds::v1"`},
		{"stack without image", map[string]string{"stackImages": "r/tools:v1"}, Attributes{}, `volume attribute "image" is required`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseAttributes(tc.attrs)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || fault.Of(err) != fault.Invalid {
					t.Fatalf("ParseAttributes(%v) = %v, want InvalidArgument containing %q", tc.attrs, err, tc.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseAttributes(%v) = %+v, %v; want %+v", tc.attrs, got, err, tc.want)
			}
		})
	}
}

func TestPodOfIdentity(t *testing.T) {
	t.Parallel()
	vctx := map[string]string{attrPodNamespace: "ns", attrPodName: "p", attrPodUID: "u", attrServiceAccount: "puller", AttrTokens: tokensJSON}
	pod, secrets, err := PodOf(vctx, nil)
	if err != nil || pod.Namespace != "ns" || pod.ServiceAccount != "puller" || pod.Tokens["registry.io"] != "eyJ-secret-token" || pod.Tokens[""] != "default-aud-token" || secrets != nil {
		t.Errorf("identity %+v, secrets %v, err %v", pod, secrets, err)
	}
	in := map[string]string{AttrTokens: tokensJSON, ".dockerconfigjson": "{}"}
	pod, secrets, err = PodOf(map[string]string{attrServiceAccount: "puller"}, in)
	if err != nil || pod.Tokens["registry.io"] != "eyJ-secret-token" || len(secrets) != 1 || len(in) != 2 {
		t.Errorf("from secrets: identity %+v, secrets %v (in %v), err %v", pod, secrets, in, err)
	}
	_, _, err = PodOf(map[string]string{AttrTokens: `{"a": "eyJ-broken`}, nil)
	if err == nil || strings.Contains(err.Error(), "eyJ") || !strings.Contains(err.Error(), AttrTokens) {
		t.Errorf("malformed tokens: %v", err)
	}
	if s := pod.String(); strings.Contains(s, "eyJ") {
		t.Errorf("Pod.String shows a token: %s", s)
	}
}

func TestCloneAttributes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		attrs   map[string]string
		clone   bool
		size    int64
		wantErr string
	}{
		{"clone with capacity", map[string]string{"image": "r/x", AttrClone: "true", AttrCapacity: "1048576"}, true, 1 << 20, ""},
		{"clone without capacity", map[string]string{"image": "r/x", AttrClone: "true"}, true, 0, ""},
		{"not a clone", map[string]string{"image": "r/x", AttrClone: "false"}, false, 0, ""},
		{"clone not a bool", map[string]string{"image": "r/x", AttrClone: "yes please"}, false, 0, "is not true or false"},
		{"zero capacity", map[string]string{"image": "r/x", AttrClone: "true", AttrCapacity: "0"}, false, 0, "not a positive number"},
		{"negative capacity", map[string]string{"image": "r/x", AttrClone: "true", AttrCapacity: "-5"}, false, 0, "not a positive number"},
		{"capacity with a unit", map[string]string{"image": "r/x", AttrClone: "true", AttrCapacity: "1Gi"}, false, 0, "not a positive number"},
		{"capacity without clone", map[string]string{"image": "r/x", AttrCapacity: "1024"}, false, 0, "applies to clones only"},
		{"cloneOf without clone", map[string]string{"image": "r/x", AttrCloneOf: "strata-00112233445566778899aabbccddeeff"}, false, 0, "only a clone starts"},
		{"csi-provisioner's identity", map[string]string{"image": "r/x", AttrClone: "true", attrProvisionerIdentity: "1700000000000-8081-strata.csi.dev"}, true, 0, ""},
		{"other reserved key", map[string]string{"image": "r/x", "strata.csi.dev/other": "1"}, false, 0, `unknown volume attribute "strata.csi.dev/other"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseAttributes(tc.attrs)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || fault.Of(err) != fault.Invalid {
					t.Fatalf("ParseAttributes(%v) = %v, want InvalidArgument containing %q", tc.attrs, err, tc.wantErr)
				}
				return
			}
			if err != nil || got.Clone != tc.clone || got.CloneCapacity != tc.size {
				t.Fatalf("ParseAttributes(%v) = clone %v capacity %d (%v); want clone %v capacity %d", tc.attrs, got.Clone, got.CloneCapacity, err, tc.clone, tc.size)
			}
		})
	}
}
