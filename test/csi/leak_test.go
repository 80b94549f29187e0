package csitest

import (
	"strings"
	"testing"

	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/test/testimage"
)

// TestPublishErrorsDoNotEchoRegistryAnswers: the status message of a failed
// NodePublishVolume (which kubelet puts in the pod's events) never repeats
// what the named "registry" answered, whatever it is: the plugin is on the
// host network, and a volume may name a node-local port.
func TestPublishErrorsDoNotEchoRegistryAnswers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, tc := range []struct {
		mode testimage.LeakMode
		want []string // in the status message
	}{
		{testimage.LeakPingText, []string{"404"}},
		{testimage.LeakPingJSON, []string{"403", "DENIED"}},
		{testimage.LeakManifestText, []string{"404"}},
		{testimage.LeakManifestJSON, []string{"MANIFEST_UNKNOWN"}},
		{testimage.LeakToken, nil},
		{testimage.LeakBlob, []string{"400"}},
	} {
		t.Run(string(tc.mode), func(t *testing.T) {
			host := testimage.Server(t, testimage.Leaky(tc.mode))
			ref := host + "/leak/img:v1"
			if tc.mode == testimage.LeakBlob {
				testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "x")), testimage.Gzip)))
			}
			tgt := e.target("leak-" + string(tc.mode))
			_, err := e.Node.NodePublishVolume(ctx(t), pubReq("leak-"+string(tc.mode), tgt, map[string]string{"image": ref}))
			if err == nil {
				t.Fatal("NodePublishVolume succeeded against a registry that answers with errors")
			}
			st, ok := status.FromError(err)
			if !ok {
				t.Fatalf("got non-status error %v", err)
			}
			msg := st.Message()
			t.Logf("%v: %s", st.Code(), msg)
			if strings.Contains(msg, testimage.LeakSecret) || strings.Contains(msg, "xxxxxxxxxx") {
				t.Errorf("the status message repeats what the registry answered:\n%s", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("the status message does not say %q:\n%s", w, msg)
				}
			}
		})
	}
}
