package driver

import (
	"path"
	"sort"
	"strings"

	"github.com/strata-csi/strata/layercache"
)

// Volume attribute keys (volumeAttributes of an inline volume or PV,
// parameters of a StorageClass).
const (
	attrImage      = "image"
	attrPullPolicy = "pullPolicy"
	attrSubPath    = "subPath"
	// kubePrefix marks keys set by kubelet and the provisioner (pod name,
	// namespace, ephemeral, PV/PVC names): read where useful, never
	// rejected.
	kubePrefix = "csi.storage.k8s.io/"
	// The pod the volume is published for, passed by kubelet when the
	// CSIDriver sets podInfoOnMount.
	attrPodName      = kubePrefix + "pod.name"
	attrPodNamespace = kubePrefix + "pod.namespace"
	attrPodUID       = kubePrefix + "pod.uid"
)

// podOf returns the pod named in a volume context; empty fields when kubelet
// did not pass them.
func podOf(attrs map[string]string) podRef {
	return podRef{Namespace: attrs[attrPodNamespace], Name: attrs[attrPodName], UID: attrs[attrPodUID]}
}

// volumeAttributes is the parsed user-facing contract of a volume.
type volumeAttributes struct {
	Image      string
	PullPolicy layercache.PullPolicy
	SubPath    string // cleaned, relative; "" for the whole image
}

// parseAttributes validates a volume context. Unknown keys are an error that
// names them, so that a typo ("pullpolicy") is not silently ignored.
func parseAttributes(attrs map[string]string) (volumeAttributes, error) {
	var v volumeAttributes
	var unknown []string
	for k, val := range attrs {
		switch {
		case k == attrImage:
			v.Image = strings.TrimSpace(val)
		case k == attrPullPolicy:
			p, err := layercache.ParsePullPolicy(val)
			if err != nil {
				return v, invalid("volume attribute %s: %v", attrPullPolicy, err)
			}
			v.PullPolicy = p
		case k == attrSubPath:
			sub := path.Clean("/" + val)[1:]
			v.SubPath = sub
		case strings.HasPrefix(k, kubePrefix):
		default:
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return v, invalid("unknown volume attribute %q: the attributes are %s, %s and %s",
			strings.Join(unknown, `", "`), attrImage, attrPullPolicy, attrSubPath)
	}
	if v.Image == "" {
		return v, invalid("volume attribute %q is required: name the OCI image to mount, e.g. registry.example.com/datasets/imagenet:v1", attrImage)
	}
	if v.PullPolicy == "" {
		v.PullPolicy = layercache.PullIfNotPresent
	}
	return v, nil
}
