// Package tasks runs the plugin's background work: the sweep of deleted
// clones, the prepulls, the VolumeCommit watcher and the storage capacity.
// A Runner starts each task with one context, logs when it starts and
// ends, and stops them all together.
package tasks

import (
	"context"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// Runner runs background tasks until Stop. The zero value is not usable:
// make one with New.
type Runner struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New returns a Runner whose tasks run until parent ends or Stop is
// called.
func New(parent context.Context) *Runner {
	ctx, cancel := context.WithCancel(parent)
	return &Runner{ctx: ctx, cancel: cancel}
}

// Go runs fn in the background with the runner's context, which carries a
// logger with the task's name (key "task"). fn must return once the
// context ends. Go after Stop does not run fn.
func (r *Runner) Go(name string, fn func(ctx context.Context)) {
	if r.ctx.Err() != nil {
		klog.V(2).InfoS("Background task not started: stopping", "task", name)
		return
	}
	logger := klog.FromContext(r.ctx).WithValues("task", name)
	ctx := klog.NewContext(r.ctx, logger)
	r.wg.Go(func() {
		start := time.Now()
		logger.V(2).Info("Background task started")
		fn(ctx)
		logger.V(2).Info("Background task ended", "duration", time.Since(start).Round(time.Millisecond), "stopped", ctx.Err() != nil)
	})
}

// Stop ends the tasks' context and waits for every task to return.
func (r *Runner) Stop() {
	r.cancel()
	r.wg.Wait()
}
