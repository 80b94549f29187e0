// Command e2eimages prints the images of Kubernetes' e2e suite, at the
// bundle's Kubernetes version, that the external-storage specs run besides
// busybox, one per line: agnhost, nginx, glibc-dns-testing. No registry
// serves them here: hack/cluster/build makes images under these names (the
// real agnhost, built from the same module; busybox stand-ins for the two
// others, whose commands the specs override).
package main

import (
	"fmt"

	imageutils "k8s.io/kubernetes/test/utils/image"
)

func main() {
	for _, id := range []imageutils.ImageID{imageutils.Agnhost, imageutils.Nginx, imageutils.GlibcDnsTesting} {
		fmt.Println(imageutils.GetE2EImage(id))
	}
}
