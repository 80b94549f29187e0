package driver

import (
	"context"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/capacity"
)

// published is the CSIStorageCapacity a node plugin publishes.
func published(name, node, class string, room, maxSize int64) *storagev1.CSIStorageCapacity {
	return &storagev1.CSIStorageCapacity{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "strata-system", Labels: map[string]string{
			capacity.LabelDriverName: DefaultName, capacity.LabelManagedBy: capacity.ManagedBy(node)}},
		NodeTopology:      &metav1.LabelSelector{MatchLabels: map[string]string{TopologyKey: node}},
		StorageClassName:  class,
		Capacity:          resource.NewQuantity(room, resource.BinarySI),
		MaximumVolumeSize: resource.NewQuantity(maxSize, resource.BinarySI),
	}
}

// TestGetCapacityController: the controller answers GetCapacity from the
// objects the node plugins published: a node's room, 0 for a node that
// published none or a topology without a Strata node, and without a
// topology the sum of the rooms and the largest clone.
func TestGetCapacityController(t *testing.T) {
	kube := fake.NewClientset(
		published("a", "n1", "strata-a", 10<<30, 9<<30), published("b", "n1", "strata-b", 10<<30, 9<<30),
		published("c", "n2", "strata-a", 3<<30, 2<<30),
		// Another driver's object names n3: not Strata's room.
		&storagev1.CSIStorageCapacity{ObjectMeta: metav1.ObjectMeta{Name: "ebs", Namespace: "strata-system",
			Labels: map[string]string{capacity.LabelDriverName: "ebs.csi.aws.com"}},
			NodeTopology: &metav1.LabelSelector{MatchLabels: map[string]string{TopologyKey: "n3"}}, StorageClassName: "x",
			Capacity: resource.NewQuantity(1<<40, resource.BinarySI)},
	)
	d, err := New(Config{Mode: ModeController, Kube: kube, CapacityNamespace: "strata-system"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	req := func(segments map[string]string) *csi.GetCapacityRequest {
		if segments == nil {
			return &csi.GetCapacityRequest{}
		}
		return &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: segments}}
	}
	// Before the objects are listed: Unavailable, never a wrong 0.
	if _, err := d.GetCapacity(ctx, req(map[string]string{TopologyKey: "n1"})); status.Code(toStatus(err)) != codes.Unavailable {
		t.Errorf("GetCapacity before the informer synced: %v, want Unavailable", err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := d.GetCapacity(ctx, req(map[string]string{TopologyKey: "n1"})); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the controller's reader of CSIStorageCapacity objects did not sync")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, tc := range []struct {
		name          string
		segments      map[string]string
		room, maxSize int64
	}{
		{"node n1", map[string]string{TopologyKey: "n1"}, 10 << 30, 9 << 30},
		{"node n2", map[string]string{TopologyKey: "n2"}, 3 << 30, 2 << 30},
		{"unknown node", map[string]string{TopologyKey: "n9"}, 0, 0},
		{"node of another driver only", map[string]string{TopologyKey: "n3"}, 0, 0},
		{"other topology", map[string]string{"topology.kubernetes.io/zone": "z1"}, 0, 0},
		{"no topology", nil, 13 << 30, 9 << 30},
	} {
		resp, err := d.GetCapacity(ctx, req(tc.segments))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if resp.AvailableCapacity != tc.room || resp.GetMaximumVolumeSize().GetValue() != tc.maxSize {
			t.Errorf("%s: capacity %d, maximum %v; want %d, %d", tc.name, resp.AvailableCapacity, resp.MaximumVolumeSize, tc.room, tc.maxSize)
		}
	}
}

// TestGetCapacityNoAPI: a controller without API access knows no node's
// room, and says 0 rather than fail.
func TestGetCapacityNoAPI(t *testing.T) {
	d, err := New(Config{Mode: ModeController})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	resp, err := d.GetCapacity(context.Background(), &csi.GetCapacityRequest{AccessibleTopology: nodeTopology("n1")})
	if err != nil || resp.AvailableCapacity != 0 {
		t.Errorf("GetCapacity without API access: %v, %v; want 0", resp, err)
	}
}
