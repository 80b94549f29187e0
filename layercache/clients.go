package layercache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
)

// clientTTL is how long a connected client (its ping of the registry and,
// for token auth, its token) serves later requests of the same repository
// with the same credentials: a wave of publishes of one image connects
// once, not once per publish. A token that expires meanwhile is renewed on
// the registry's challenge, as go-containerregistry's transport does.
const clientTTL = time.Minute

// sharedClient is one client being connected, or connected at.
type sharedClient struct {
	done chan struct{}
	c    *client
	err  error
	at   time.Time
}

// clientFor connects to ep with kc's credentials, or returns the client that
// a caller with the same credentials, the same repository and the same view
// of the registry config connected within clientTTL; callers that ask while
// one connects wait for it. Credentials that differ never share a client.
func (s *Store) clientFor(ctx context.Context, h *hosts, ep *endpoint, kc authn.Keychain) (*client, error) {
	cred, err := ep.accessKey(kc)
	if err != nil {
		return nil, err
	}
	key := fmt.Sprintf("%p %s %s", h, ep.repo.Name(), cred)
	for {
		s.mu.Lock()
		e := s.clients[key]
		if e == nil || (e.c != nil && time.Since(e.at) > clientTTL) {
			s.forgetClientsLocked()
			e = &sharedClient{done: make(chan struct{})}
			s.clients[key] = e
			s.mu.Unlock()
			c, err := s.newClient(ctx, h, ep, kc)
			s.mu.Lock()
			e.c, e.err, e.at = c, err, time.Now()
			if err != nil && s.clients[key] == e {
				delete(s.clients, key) // the next caller tries again
			}
			s.mu.Unlock()
			close(e.done)
			return c, err
		}
		s.mu.Unlock()
		select {
		case <-e.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to %s: %w", ep.host(), ctx.Err())
		}
		if askAgain(ctx, e.err) {
			continue
		}
		return e.c, e.err
	}
}

// forgetClientsLocked drops the shared clients that are older than clientTTL.
// The caller holds s.mu.
func (s *Store) forgetClientsLocked() {
	for k, e := range s.clients {
		if e.c != nil && time.Since(e.at) > clientTTL {
			delete(s.clients, k)
		}
	}
}

// askAgain reports whether a caller that waited for another's request must
// make its own: the request failed because the asking call ended (kubelet's
// deadline, a cancel), while this caller's still runs.
func askAgain(ctx context.Context, shared error) bool {
	return shared != nil && (errors.Is(shared, context.Canceled) || errors.Is(shared, context.DeadlineExceeded)) && ctx.Err() == nil
}
