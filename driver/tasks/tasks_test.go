package tasks

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/klog/v2"
)

func TestStopEndsAndWaitsForEveryTask(t *testing.T) {
	r := New(context.Background())
	var ended atomic.Int32
	names := make(chan string, 3)
	for _, name := range []string{"a", "b", "c"} {
		r.Go(name, func(ctx context.Context) {
			// The context carries the task's logger.
			if klog.FromContext(ctx).GetSink() == nil {
				t.Errorf("task %s: no logger in its context", name)
			}
			names <- name
			<-ctx.Done()
			time.Sleep(10 * time.Millisecond) // Stop must wait for this
			ended.Add(1)
		})
	}
	for range 3 {
		<-names
	}
	r.Stop()
	if n := ended.Load(); n != 3 {
		t.Fatalf("Stop returned with %d of 3 tasks ended", n)
	}
	ran := false
	r.Go("late", func(context.Context) { ran = true })
	r.Stop()
	if ran {
		t.Error("a task given after Stop ran")
	}
}

func TestParentContextEndsTasks(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	r := New(parent)
	done := make(chan struct{})
	r.Go("watch", func(ctx context.Context) {
		<-ctx.Done()
		close(done)
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the task did not see its parent context end")
	}
	r.Stop()
}
