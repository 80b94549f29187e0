package engine

import (
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"sort"
	"strconv"
	"strings"
	"unicode"

	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/layercache"
)

// Volume attribute keys (Attributes of an inline volume or PV,
// parameters of a StorageClass).
const (
	attrImage      = "image"
	attrPullPolicy = "pullPolicy"
	attrSubPath    = "subPath"
	// attrStackImages lists images stacked above image, bottom first,
	// separated by commas or white space (a reference holds neither), so
	// that one line of a StorageClass parameter or a YAML block of one
	// reference per line both work.
	attrStackImages = "stackImages"
	// AttrSize caps the writable upper of an inline volume or a static
	// PersistentVolume, as a Kubernetes quantity (e.g. 1Gi); without it
	// the plugin's --default-upper-size applies. A clone's cap is its
	// claim's size (AttrCapacity), so size is refused on clones and in a
	// StorageClass.
	AttrSize = "size"
	// KubePrefix marks keys set by kubelet and the provisioner (pod name,
	// namespace, ephemeral, PV/PVC names): read where useful, never
	// rejected.
	KubePrefix = "csi.storage.k8s.io/"
	// The pod the volume is published for, passed by kubelet when the
	// CSIDriver sets podInfoOnMount.
	attrPodName      = KubePrefix + "pod.name"
	attrPodNamespace = KubePrefix + "pod.namespace"
	attrPodUID       = KubePrefix + "pod.uid"
	// The pod's ServiceAccount (podInfoOnMount) and its tokens, as JSON
	// {"<audience>": {"token": "...", "expirationTimestamp": "..."}}, passed
	// when the CSIDriver has tokenRequests: in the volume context, or in
	// the secrets when it sets serviceAccountTokenInSecrets. The tokens are
	// credentials: they are never logged (see sanitize) nor stored.
	attrServiceAccount = KubePrefix + "serviceAccount.name"
	AttrTokens         = KubePrefix + "serviceAccount.tokens"
	// ReservedPrefix marks the keys that the controller sets in the volume
	// context of a volume it provisions: a StorageClass must not set them,
	// a static PersistentVolume may (to name a clone made beforehand).
	ReservedPrefix = "strata.csi.dev/"
	// AttrClone "true" makes the volume a persistent clone: its writes
	// live in clones/<volumeID>/ on the node until the volume is deleted.
	AttrClone = ReservedPrefix + "clone"
	// AttrCapacity is a clone's size in bytes, a positive integer: its
	// writes fail with ENOSPC beyond it.
	AttrCapacity = ReservedPrefix + "capacity"
	// AttrCloneOf names the clone (its volume id) whose writes a new clone
	// starts from: a claim whose dataSource is another claim. The source
	// lives on the same node; the node copies it at the new clone's making.
	AttrCloneOf = ReservedPrefix + "cloneOf"
	// attrProvisionerIdentity is added to the volume attributes of the PVs
	// that the upstream csi-provisioner sidecar creates: accepted, unused.
	attrProvisionerIdentity = "storage.kubernetes.io/csiProvisionerIdentity"
)

// DefaultCloneCapacity is the size of a clone whose claim requests none.
const DefaultCloneCapacity int64 = 1 << 30

// DefaultUpperSize is the cap on the writable upper of an inline volume or a
// static PersistentVolume that sets no size (--default-upper-size). Its
// filesystem image takes only the blocks the pod writes, so a generous cap
// costs nothing until used; 10 GiB keeps room for the scratch files and the
// copied-up files of a dataset's pod while a runaway writer still stops
// long before a node disk of a few hundred GiB is full.
const DefaultUpperSize int64 = 10 << 30

// MinUpperSize is the smallest cap: the smallest ext4 image the upper's
// filesystem is made as.
const MinUpperSize int64 = 1 << 20

// ParseUpperSize parses a cap on a writable upper, a Kubernetes quantity
// such as 1Gi, 512Mi or 1.5G, in bytes (rounded up). It must be at least
// MinUpperSize.
func ParseUpperSize(s string) (int64, error) {
	q, err := resource.ParseQuantity(strings.TrimSpace(s))
	if err != nil || q.Sign() <= 0 {
		return 0, fmt.Errorf("%q is not a positive Kubernetes quantity: give a size of at least 1Mi, e.g. 1Gi or 512Mi", s)
	}
	n, ok := q.AsInt64()
	if !ok {
		n = q.Value() // rounds a fraction of a byte up
	}
	if q.CmpInt64(clonefs.MaxSize) > 0 {
		return 0, fmt.Errorf("%q is more than the %d MiB (about 95 TiB) an upper's filesystem can have", s, int64(clonefs.MaxSize>>20))
	}
	if n < MinUpperSize {
		return 0, fmt.Errorf("%q is %d bytes: the size of a writable upper must be at least 1Mi, e.g. 1Gi", s, n)
	}
	return n, nil
}

// PodOf returns the pod of a publish, parsed once from its volume context
// (podInfoOnMount) and its secrets (the ServiceAccount tokens, when the
// CSIDriver has tokenRequests), and the secrets without the tokens: what is
// left is the volume's node-publish secret. Fields kubelet did not pass are
// empty.
func PodOf(volumeContext, secrets map[string]string) (credentials.Pod, map[string]string, error) {
	pod := credentials.Pod{
		Namespace: volumeContext[attrPodNamespace], Name: volumeContext[attrPodName], UID: volumeContext[attrPodUID],
		ServiceAccount: volumeContext[attrServiceAccount],
	}
	raw := volumeContext[AttrTokens]
	if s, ok := secrets[AttrTokens]; ok {
		raw = s
		secrets = maps.Clone(secrets)
		delete(secrets, AttrTokens)
	}
	if raw == "" {
		return pod, secrets, nil
	}
	// kubelet's map of audience to authentication/v1 TokenRequestStatus.
	var tokens map[string]struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(raw), &tokens); err != nil {
		// Not the decoder's message: it could quote part of a token.
		return pod, secrets, invalid("%s is not kubelet's JSON map of audience to token: check the CSIDriver's tokenRequests", AttrTokens)
	}
	pod.Tokens = make(map[string]string, len(tokens))
	for aud, t := range tokens {
		pod.Tokens[aud] = t.Token
	}
	return pod, secrets, nil
}

// Attributes is the parsed user-facing contract of a volume.
type Attributes struct {
	Image string // the bottom image of the stack
	// StackImages are the images above Image, bottom first; nil for a
	// volume of one image.
	StackImages []string
	PullPolicy  layercache.PullPolicy
	SubPath     string // cleaned, relative; "" for the whole image
	// Clone is a persistent clone of the stack (AttrClone), of
	// CloneCapacity bytes (AttrCapacity; 0 when not given).
	Clone         bool
	CloneCapacity int64
	// CloneOf is the volume id of the clone this clone starts from
	// (AttrCloneOf); "" for a clone of the image alone.
	CloneOf string
	// Size caps the writable upper (AttrSize), in bytes; 0 when not
	// given.
	Size int64
}

// Images returns the volume's whole stack of images, bottom first.
func (v Attributes) Images() []string {
	return append([]string{v.Image}, v.StackImages...)
}

// ParseAttributes validates a volume context. Unknown keys are an error that
// names them, so that a typo ("pullpolicy") is not silently ignored.
func ParseAttributes(attrs map[string]string) (Attributes, error) {
	var v Attributes
	var unknown []string
	for k, val := range attrs {
		switch {
		case k == attrImage:
			v.Image = strings.TrimSpace(val)
		case k == attrStackImages:
			refs, err := parseStackImages(val)
			if err != nil {
				return v, err
			}
			v.StackImages = refs
		case k == attrPullPolicy:
			p, err := layercache.ParsePullPolicy(val)
			if err != nil {
				return v, invalid("volume attribute %s: %v", attrPullPolicy, err)
			}
			v.PullPolicy = p
		case k == attrSubPath:
			sub := path.Clean("/" + val)[1:]
			v.SubPath = sub
		case k == AttrClone:
			b, err := strconv.ParseBool(val)
			if err != nil {
				return v, invalid("volume attribute %s: %q is not true or false", AttrClone, val)
			}
			v.Clone = b
		case k == AttrSize:
			n, err := ParseUpperSize(val)
			if err != nil {
				return v, invalid("volume attribute %s: %v", AttrSize, err)
			}
			v.Size = n
		case k == AttrCapacity:
			n, err := strconv.ParseInt(strings.TrimSpace(val), 10, 64)
			if err != nil || n <= 0 {
				return v, invalid("volume attribute %s: %q is not a positive number of bytes", AttrCapacity, val)
			}
			v.CloneCapacity = n
		case k == AttrCloneOf:
			v.CloneOf = strings.TrimSpace(val)
		case strings.HasPrefix(k, KubePrefix), k == attrProvisionerIdentity:
		default:
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return v, invalid("unknown volume attribute %q: the attributes are %s, %s, %s, %s and %s",
			strings.Join(unknown, `", "`), attrImage, attrStackImages, attrPullPolicy, attrSubPath, AttrSize)
	}
	if v.CloneCapacity > 0 && !v.Clone {
		return v, invalid("volume attribute %s is set but %s is not \"true\": a capacity applies to clones only", AttrCapacity, AttrClone)
	}
	if v.CloneOf != "" && !v.Clone {
		return v, invalid("volume attribute %s is set but %s is not \"true\": only a clone starts from another clone's writes", AttrCloneOf, AttrClone)
	}
	if v.Size > 0 && v.Clone {
		return v, invalid("volume attribute %s is set on a persistent clone: a clone's cap is its capacity, %s (its claim's storage request); remove %s",
			AttrSize, AttrCapacity, AttrSize)
	}
	if v.Image == "" {
		return v, invalid("volume attribute %q is required: name the OCI image to mount, e.g. registry.example.com/datasets/imagenet:v1", attrImage)
	}
	if err := checkReference(attrImage, v.Image); err != nil {
		return v, err
	}
	if v.PullPolicy == "" {
		v.PullPolicy = layercache.PullIfNotPresent
	}
	return v, nil
}

// parseStackImages splits the stackImages attribute into references, bottom
// first. Commas and white space separate them; a value that names no image
// is an error rather than a one-image volume, since it is most likely a
// template that rendered empty.
func parseStackImages(val string) ([]string, error) {
	refs := strings.FieldsFunc(val, func(r rune) bool { return r == ',' || unicode.IsSpace(r) })
	if len(refs) == 0 {
		return nil, invalid("volume attribute %s is empty: list the images to stack above %s, bottom first, separated by commas, or remove the attribute",
			attrStackImages, attrImage)
	}
	// Every image brings at least one layer, usually many: a longer list
	// can never fit under overlayfs's cap, so it is refused before anything
	// is resolved.
	if len(refs) >= mount.MaxLowers {
		return nil, invalid("volume attribute %s names %d images; a stack holds at most %d layers", attrStackImages, len(refs), mount.MaxLowers)
	}
	for _, ref := range refs {
		if err := checkReference(attrStackImages, ref); err != nil {
			return nil, err
		}
	}
	return refs, nil
}

// checkReference refuses a reference that does not parse, naming the
// attribute it came from: in a list of images, the bad one is otherwise hard
// to spot.
func checkReference(attr, ref string) error {
	if _, err := name.ParseReference(ref); err != nil {
		return invalid("volume attribute %s: invalid image reference %q: %v: write it as host[:port]/repository[:tag][@sha256:digest]", attr, ref, err)
	}
	return nil
}

// ParseMountOptions parses a volume's mount options (the capability's mount
// flags: a class's or a PersistentVolume's mountOptions). readOnly is true
// when they say "ro". An option that does not apply is an InvalidArgument
// error that names it.
func ParseMountOptions(flags []string) (o mount.Options, readOnly bool, err error) {
	o, readOnly, err = mount.ParseOptions(flags)
	if err != nil {
		return o, false, invalid("mountOptions %q: %v", flags, err)
	}
	return o, readOnly, nil
}
