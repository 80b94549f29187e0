// Package peak follows a quantity while a test or benchmark runs (disk use,
// heap, free inodes) and keeps its largest value.
package peak

import (
	"sync"
	"time"
)

// Watch calls sample now, every interval, and once more at the end, until
// the returned function is called; that returns the largest value sampled.
// Calling it again returns the same value. To follow a minimum, sample the
// negated quantity.
func Watch(interval time.Duration, sample func() int64) func() int64 {
	var mu sync.Mutex
	most := sample()
	record := func() {
		v := sample()
		mu.Lock()
		most = max(most, v)
		mu.Unlock()
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(interval):
				record()
			}
		}
	}()
	var once sync.Once
	return func() int64 {
		once.Do(func() { close(stop); <-done; record() })
		mu.Lock()
		defer mu.Unlock()
		return most
	}
}
