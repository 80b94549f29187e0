//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// modelRef is a CNCF ModelPack model (an OCI artifact, not an image): two
// weight shards and a README as raw files, and a config tar.
var modelRef = registryAddr + "/e2e/model:v1"

func pushModel(t *testing.T) {
	raw := func(data, path string) testimage.Blob {
		return testimage.Blob{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: []byte(data),
			Annotations: map[string]string{testimage.ModelFilepath: path}}
	}
	testimage.PushArtifact(t, modelRef, testimage.Artifact{ArtifactType: testimage.ModelManifest, ConfigMediaType: testimage.ModelConfig,
		Config: []byte(`{"descriptor":{"name":"e2e"}}`), Layers: []testimage.Blob{
			raw("shard one\n", "weights/model-00001-of-00002.safetensors"),
			raw("shard two\n", "weights/model-00002-of-00002.safetensors"),
			{MediaType: "application/vnd.cncf.model.weight.config.v1.tar", Data: testimage.Tar(t, testimage.File("config.json", "{\"layers\": 2}\n"))},
			raw("# e2e model\n", "README.md"),
		}}, remote.WithTransport(netnsTransport()))
}

// modelDeployment is 3 replicas that mount the model read-only.
func modelDeployment(image string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: serve
spec:
  replicas: 3
  selector:
    matchLabels: {app: serve}
  template:
    metadata:
      labels: {app: serve}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: main
        image: %s
        command: ["sleep", "86400"]
        volumeMounts:
        - {name: model, mountPath: /model, readOnly: true}
      volumes:
      - name: model
        csi:
          driver: %s
          readOnly: true
          volumeAttributes:
            image: %s
`, busybox, driverName, image)
}

// testModelVolumes: a model pushed as a ModelPack artifact serves a
// 3-replica Deployment read-only (each pod sees its files; the node holds
// one copy), and a pod stacks it over the dataset image.
func testModelVolumes(t *testing.T) {
	pushModel(t)
	ns := namespace(t, "e2e-model")
	apply(t, ns, modelDeployment(modelRef))
	eventually(t, 2*time.Minute, "deployment serve 3/3 ready", func() (bool, error) {
		dep, err := kube.AppsV1().Deployments(ns).Get(context.Background(), "serve", metav1.GetOptions{})
		return err == nil && dep.Status.ReadyReplicas == 3, err
	})
	pods, err := kube.CoreV1().Pods(ns).List(ctx(t), metav1.ListOptions{LabelSelector: "app=serve"})
	if err != nil || len(pods.Items) != 3 {
		t.Fatalf("pods of the deployment: %v, %v", pods, err)
	}
	const want = "shard one\nshard two\n{\"layers\": 2}\n# e2e model\n"
	lowers := map[string]bool{}
	for i := range pods.Items {
		p := &pods.Items[i]
		out := mustExec(t, ns, p.Name, "cat /model/weights/model-00001-of-00002.safetensors /model/weights/model-00002-of-00002.safetensors /model/config.json /model/README.md")
		if out != want {
			t.Errorf("%s reads %q from the model, want %q", p.Name, out, want)
		}
		if out, err := podExec(ns, p.Name, "touch /model/new"); err == nil || !strings.Contains(out, "Read-only file system") {
			t.Errorf("%s: touch on the read-only model: %v %q, want EROFS", p.Name, err, out)
		}
		ms := overlaysUnder(t, volumePath(p, "model"))
		if len(ms) != 1 || !ms[0].HasOption("ro") {
			t.Fatalf("%s: model mounts %+v, want one read-only overlay", p.Name, ms)
		}
		lowers[ms[0].SuperOpts] = true
	}
	if len(lowers) != 1 {
		t.Errorf("the 3 replicas mount %d different stacks of lowers, want one (the node's one copy): %v", len(lowers), lowers)
	}

	createPod(t, ns, testPod{name: "stacked", image: datasetRef, stackImages: modelRef}.manifest())
	waitRunning(t, ns, "stacked")
	out := mustExec(t, ns, "stacked", "cat /data/data/README /data/README.md /data/weights/model-00002-of-00002.safetensors; echo tuned > /data/weights/model-00002-of-00002.safetensors; cat /data/weights/model-00002-of-00002.safetensors")
	if want := "dataset v1\n# e2e model\nshard two\ntuned\n"; out != want {
		t.Errorf("the model stacked over the dataset shows %q, want %q (both trees, and its own writes)", out, want)
	}
	if out := mustExec(t, ns, pods.Items[0].Name, "cat /model/weights/model-00002-of-00002.safetensors"); out != "shard two\n" {
		t.Errorf("a replica sees %q after another pod's write, want the original", out)
	}
}

// testModelFineTune: a StatefulSet's clone of the model gets a fine-tune's
// writes, which a VolumeCommit pushes as a new version of the model: an
// artifact still, which a pod mounts with the writes.
func testModelFineTune(t *testing.T) {
	pushModel(t)
	const class = "strata-e2e-model"
	createClassOf(t, class, modelRef, "")
	ns := namespace(t, "e2e-finetune")
	apply(t, ns, cloneSet{name: "tune", replicas: 1, class: class, size: 64 << 20, volume: "model", mountPath: "/model"}.manifest())
	waitRunning(t, ns, "tune-0")
	mustExec(t, ns, "tune-0", "echo tuned > /model/weights/model-00002-of-00002.safetensors && echo lora > /model/weights/adapter.safetensors && rm /model/README.md")

	tuned := registryAddr + "/e2e/model:v2"
	apply(t, ns, fmt.Sprintf(`apiVersion: strata.csi.dev/v1alpha1
kind: VolumeCommit
metadata:
  name: v2
spec:
  source:
    pod:
      name: tune-0
      volume: model
  image: %s
`, tuned))
	vc := commitSucceeded(t, ns, "v2")

	ref, err := name.ParseReference(vc.Status.ImageRef, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref, remote.WithTransport(netnsTransport()))
	if err != nil {
		t.Fatal(err)
	}
	var man struct {
		ArtifactType string `json:"artifactType"`
		Layers       []struct {
			MediaType string `json:"mediaType"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(desc.Manifest, &man); err != nil || man.ArtifactType != testimage.ModelManifest || len(man.Layers) != 5 {
		t.Fatalf("the committed model's manifest (%v): %s; want the model's artifactType and one more layer", err, desc.Manifest)
	}

	createPod(t, ns, testPod{name: "serve-v2", image: vc.Status.ImageRef, readOnly: true}.manifest())
	waitRunning(t, ns, "serve-v2")
	out := mustExec(t, ns, "serve-v2", "cat /data/weights/model-00001-of-00002.safetensors /data/weights/model-00002-of-00002.safetensors /data/weights/adapter.safetensors; "+
		"test -e /data/README.md && echo readme-present || echo readme-deleted")
	if want := "shard one\ntuned\nlora\nreadme-deleted\n"; out != want {
		t.Errorf("a pod of the committed model sees %q, want %q", out, want)
	}
}
