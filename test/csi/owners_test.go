package csitest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/strata-csi/strata/test/testimage"
)

// cliBin builds the strata CLI once, for the tests that read the plugin's
// state with it, beside the plugin (TestMain removes that directory).
var cliBin = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(filepath.Dir(pluginBin), "strata")
	return bin, BuildCommand("github.com/strata-csi/strata/cmd/strata", bin)
})

// TestLsNamesThePods publishes with the pod kubelet names in the volume
// context (podInfoOnMount), and checks that volume.json records it and that
// `strata ls --json` names it for each layer the publish holds.
func TestLsNamesThePods(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/owners/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "aaaa")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("b", "bbbb")), testimage.Gzip),
	))
	tgt := e.target("web")
	e.publish(pubReq("vol-web", tgt, map[string]string{"image": ref,
		"csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop",
		"csi.storage.k8s.io/pod.uid": "8d7c3b4e-uid", "csi.storage.k8s.io/ephemeral": "true"}))
	plain := e.publishImage("vol-plain", ref) // as kubelet without podInfoOnMount

	var rec struct {
		PodNamespace, PodName, PodUID string
	}
	data, err := os.ReadFile(filepath.Join(e.volumeDir(tgt), "volume.json"))
	if err == nil {
		err = json.Unmarshal(data, &rec)
	}
	if err != nil || rec.PodNamespace != "shop" || rec.PodName != "web-0" || rec.PodUID != "8d7c3b4e-uid" {
		t.Errorf("volume.json = %s (%v), want podNamespace shop, podName web-0, podUID 8d7c3b4e-uid", data, err)
	}

	bin, err := cliBin()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--root", e.root, "ls", "--json").Output()
	if err != nil {
		t.Fatalf("strata ls --json: %v\n%s", err, out)
	}
	var ls struct {
		Layers []struct {
			DiffID  string
			Volumes []struct{ VolumeID, TargetPath, PodNamespace, PodName, PodUID string }
		}
	}
	if err := json.Unmarshal(out, &ls); err != nil {
		t.Fatalf("strata ls --json: %v\n%s", err, out)
	}
	if len(ls.Layers) != 2 {
		t.Fatalf("strata ls --json: want 2 layers, got %s", out)
	}
	for _, l := range ls.Layers {
		got := map[string]string{}
		for _, v := range l.Volumes {
			got[v.VolumeID] = v.PodNamespace + "/" + v.PodName + " " + v.PodUID + " " + v.TargetPath
		}
		want := map[string]string{"vol-web": "shop/web-0 8d7c3b4e-uid " + tgt, "vol-plain": "/  " + plain}
		if len(got) != len(want) || got["vol-web"] != want["vol-web"] || got["vol-plain"] != want["vol-plain"] {
			t.Errorf("strata ls --json: layer %s: volumes %v, want %v", l.DiffID, got, want)
		}
	}
	for _, v := range []struct{ id, tgt string }{{"vol-web", tgt}, {"vol-plain", plain}} {
		if err := e.unpublish(v.id, v.tgt); err != nil {
			t.Fatal(err)
		}
	}
}
