//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// toolchainRef is a small image that the stacked scenario puts above the
// dataset: a tool, and a whiteout that retracts one of the dataset's files.
var toolchainRef = registryAddr + "/e2e/toolchain:v1"

// Stacked images: a pod's volume stacks the toolchain on the dataset
// (stackImages). The pod sees the files of both, the toolchain's whiteout
// hides a dataset file as if the two were one image, the node mounts one
// overlay of all their layers, and the record names both images.
func testStackedVolume(t *testing.T) {
	tools := testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("tools"),
		testimage.Entry{Name: "tools/prep.sh", Body: "#!/bin/sh\necho prepared\n", Mode: 0o755},
		testimage.File("tools/VERSION", "toolchain 1\n"),
		testimage.Whiteout("data/labels.txt"),
	), testimage.Gzip)
	testimage.Push(t, toolchainRef, testimage.Image(t, tools), remote.WithTransport(netnsTransport()))
	toolsID, err := tools.DiffID()
	if err != nil {
		t.Fatal(err)
	}

	ns := namespace(t, "e2e-stack")
	createPod(t, ns, testPod{name: "stacked", image: datasetRef, stackImages: toolchainRef}.manifest())
	pod := waitRunning(t, ns, "stacked")
	out := mustExec(t, ns, pod.Name, "cat /data/data/README /data/data/raw/a.txt /data/tools/VERSION; sh /data/tools/prep.sh; "+
		"test -e /data/data/labels.txt && echo labels-present || echo labels-hidden; "+
		"test -e /data/data/raw/b.txt && echo b-present || echo b-deleted; "+
		"echo mine > /data/tools/out && cat /data/tools/out")
	if want := "dataset v1\nalpha\ntoolchain 1\nprepared\nlabels-hidden\nb-deleted\nmine\n"; out != want {
		t.Fatalf("the stacked volume shows %q, want %q (both images, the toolchain's whiteout applied)", out, want)
	}

	target := volumePath(pod, "dataset")
	if ms := overlaysUnder(t, target); len(ms) != 1 || ms[0].MountPoint != target {
		t.Fatalf("overlay mounts at %s: %+v, want one for the whole stack", target, ms)
	}
	r := recordFor(t, target)
	if want := append(slices.Clone(datasetLayers), toolsID.String()); r.Image != datasetRef || !slices.Equal(r.Layers, want) {
		t.Errorf("volume record %+v: want image %s and layers %v (bottom first)", r, datasetRef, want)
	}
	var stack struct {
		Stack []struct {
			Image string `json:"image"`
		} `json:"stack"`
	}
	b, err := os.ReadFile(filepath.Join(r.dir, "volume.json"))
	if err == nil {
		err = json.Unmarshal(b, &stack)
	}
	if err != nil || len(stack.Stack) != 2 || stack.Stack[0].Image != datasetRef || stack.Stack[1].Image != toolchainRef {
		t.Errorf("volume record's stack %+v (%v): want [%s %s]", stack.Stack, err, datasetRef, toolchainRef)
	}
	podEvent(t, ns, pod.Name, "Pulled", datasetRef, toolchainRef)
}
