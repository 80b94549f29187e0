// Package commits carries out VolumeCommits (strata.csi.dev/v1alpha1), the
// Kubernetes API's way to ask for a commit: a namespaced object that names
// a volume (a pod's volume, or a PVC) and a tag, which the node plugin that
// holds the volume turns into a pushed image, and whose status tells the
// digest or the error.
//
// With --volume-commits, every node plugin watches VolumeCommits in all
// namespaces, or in those of --commit-namespaces (dynamic informers: no
// generated clients). A node takes an object only when the
// volume it names is on that node, and claims it through the status
// subresource with the object's resourceVersion, so that of two nodes that
// both think so, one gets a conflict and leaves it. Objects that Succeeded
// or Failed are never redone, and one that this node left Running when it
// stopped is carried out again when it starts.
package commits

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The API of the VolumeCommit custom resource
// (charts/strata/crds/volumecommits.yaml).
const (
	Group    = "strata.csi.dev"
	Version  = "v1alpha1"
	Resource = "volumecommits"
	Kind     = "VolumeCommit"
)

// GVR is the VolumeCommit resource.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// VolumeCommit asks the node that holds a volume to push the volume's image
// plus its writes, as one new layer, to a tag.
type VolumeCommit struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   Spec   `json:"spec"`
	Status Status `json:"status,omitempty"`
}

// Spec is what to commit and where to push it. It is immutable: a new
// commit is a new object.
type Spec struct {
	// Source names the volume; exactly one of its fields is set.
	Source Source `json:"source"`
	// Image is the tag to push (REGISTRY/REPOSITORY:TAG); the result is its
	// digest, in the status.
	Image string `json:"image"`
	// PushSecretName names a kubernetes.io/dockerconfigjson secret of the
	// VolumeCommit's namespace with push access to Image. Optional: without
	// it the push is anonymous; the driver's own credentials are never used
	// to push (they may read the base image).
	PushSecretName string `json:"pushSecretName,omitempty"`
}

// Source names the volume to commit.
type Source struct {
	// PersistentVolumeClaim is a claim of the VolumeCommit's namespace bound
	// to a Strata volume: a persistent clone, or a PV published read-write
	// once (on one node, for one pod).
	PersistentVolumeClaim string `json:"persistentVolumeClaim,omitempty"`
	// Pod is a pod's volume (inline or through a claim); the pod must be
	// running, with the volume mounted.
	Pod *PodVolume `json:"pod,omitempty"`
}

// PodVolume is a volume of a pod of the VolumeCommit's namespace.
type PodVolume struct {
	// Name of the pod.
	Name string `json:"name"`
	// Volume is the name of the volume in the pod's spec.volumes.
	Volume string `json:"volume"`
}

// Phase is where a VolumeCommit stands.
type Phase string

// Phases: Pending until a node takes it, Running while that node commits,
// then Succeeded or Failed, for good.
const (
	PhasePending   Phase = "Pending"
	PhaseRunning   Phase = "Running"
	PhaseSucceeded Phase = "Succeeded"
	PhaseFailed    Phase = "Failed"
)

// Status is what came of a VolumeCommit.
type Status struct {
	Phase Phase `json:"phase,omitempty"`
	// Node is the node that took the commit.
	Node string `json:"node,omitempty"`
	// Digest is the pushed manifest's digest, and ImageRef the image by it.
	Digest   string `json:"digest,omitempty"`
	ImageRef string `json:"imageRef,omitempty"`
	// UploadedBytes counts what the push sent to the registry; LayerBytes
	// is the new layer's compressed size, Files the regular files it holds
	// and Deletions its whiteouts.
	UploadedBytes int64 `json:"uploadedBytes,omitempty"`
	LayerBytes    int64 `json:"layerBytes,omitempty"`
	Files         int64 `json:"files,omitempty"`
	Deletions     int64 `json:"deletions,omitempty"`
	// Message says what is happening, or on Failed what went wrong and what
	// to do.
	Message        string       `json:"message,omitempty"`
	StartTime      *metav1.Time `json:"startTime,omitempty"`
	CompletionTime *metav1.Time `json:"completionTime,omitempty"`
}

// Terminal reports whether the commit is over, for good.
func (s Status) Terminal() bool { return s.Phase == PhaseSucceeded || s.Phase == PhaseFailed }

// fromUnstructured decodes a VolumeCommit read through the dynamic client.
func fromUnstructured(u *unstructured.Unstructured) (*VolumeCommit, error) {
	var vc VolumeCommit
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &vc); err != nil {
		return nil, fmt.Errorf("VolumeCommit %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return &vc, nil
}

// withStatus returns a copy of u with status st, for the status
// subresource; u's resourceVersion stays, so that the update fails with a
// conflict if the object changed since u was read.
func withStatus(u *unstructured.Unstructured, st Status) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&st)
	if err != nil {
		return nil, err
	}
	out := u.DeepCopy()
	out.Object["status"] = m
	return out, nil
}

// key is NAMESPACE/NAME.
func (vc *VolumeCommit) key() string { return vc.Namespace + "/" + vc.Name }
