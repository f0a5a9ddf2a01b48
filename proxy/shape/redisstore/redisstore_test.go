package redisstore

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/proxy/shape"
)

const secret = "s3cret-Pa55"

func TestParseURL(t *testing.T) {
	good := []struct{ url, redacted string }{
		{"redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"},
		{"redis://store.example", "redis://store.example"},
		{"redis://store.example/", "redis://store.example/"},
		{"rediss://:" + secret + "@store.example:6380/3", "rediss://:xxxxx@store.example:6380/3"},
		{"redis://egressd:" + secret + "@[2001:db8::7]:6379/1", "redis://egressd:xxxxx@[2001:db8::7]:6379/1"},
	}
	for _, tt := range good {
		t.Run(tt.redacted, func(t *testing.T) {
			u, err := ParseURL(tt.url)
			require.NoError(t, err)
			assert.Equal(t, tt.redacted, u.Redacted())
			assert.Equal(t, tt.redacted, Redact(tt.url))
		})
	}
	bad := []struct{ name, url, err string }{
		{"empty", "", `scheme "": want ` + Syntax},
		{"http", "http://:" + secret + "@h:6379", `scheme "http": want`},
		{"no host", "redis://:" + secret + "@:6379/0", "empty host"},
		{"no authority", "redis:" + secret, "no host"},
		{"port zero", "redis://h:0", `port "0": must be a number from 1 to 65535`},
		{"port too big", "redis://:" + secret + "@h:65536", `port "65536"`},
		{"port not a number", "redis://:" + secret + "@h:x1", "not a URL"},
		{"database not a number", "redis://:" + secret + "@h/zero", `database "zero": must be a number of at least 0`},
		{"database negative", "redis://h/-1", `database "-1"`},
		{"two path segments", "redis://h/1/2", `database "1/2"`},
		{"query", "redis://:" + secret + "@h/0?dial_timeout=1s", "no query or fragment allowed"},
		{"fragment", "redis://h/0#x", "no query or fragment allowed"},
		{"bad escape in the password", "redis://:" + secret + "%zz@h/0", "not a URL (a bad %-escape)"},
		{"space in the password", "redis://:" + secret + " x@h/0", "not a URL"},
		// A password holding / ? or # unescaped ends the authority there:
		// url.Parse then reads its start as a port, and quotes it.
		{"slash in the password", "redis://:" + secret + "/x@h/0", "not a URL"},
		{"hash in the password", "redis://:" + secret + "#x@h/0", "not a URL"},
		{"question mark in the password", "redis://u:" + secret + "?x@h/0", "not a URL"},
		// url.Parse ends the host at the '/', '?' or '#' and quotes what
		// it took for a port: the start of the password.
		{"slash in the password, with a port", "redis://:" + secret + "/x@h:6379/0", "must be %-escaped"},
		{"question mark in the password, with a port", "redis://:" + secret + "?x@h:6379/0", "must be %-escaped"},
		{"hash in the password, with a port", "redis://u:" + secret + "#x@h:6379/0", "must be %-escaped"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseURL(tt.url)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.err)
			assert.NotContains(t, err.Error(), secret)
			assert.NotContains(t, err.Error(), "\n")
			assert.Equal(t, "(invalid)", Redact(tt.url))
			_, err = Open(tt.url, time.Second, nil)
			assert.Error(t, err)
		})
	}
}

// openStore opens a Store on srv, closed in t.Cleanup.
func openStore(t *testing.T, url string, log *slog.Logger) *Store {
	t.Helper()
	s, err := Open(url, 250*time.Millisecond, log)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func TestAllow(t *testing.T) {
	srv := startRedis(t, secret)
	a, b := openStore(t, srv.URL(), nil), openStore(t, srv.URL(), nil) // two egressd instances
	assert.Equal(t, "redis://:xxxxx@127.0.0.1:"+itoa(srv.port)+"/0", a.Name())
	ctx := context.Background()
	allow := func(s *Store, key string, r rate.Limit, burst int) time.Duration {
		t.Helper()
		d, err := s.Allow(ctx, key, r, burst)
		require.NoError(t, err)
		return d
	}

	// 5r/s, burst 2: the burst, across both instances, then 200ms apart.
	assert.Zero(t, allow(a, "h.test/h.test", 5, 2))
	assert.Zero(t, allow(b, "h.test/h.test", 5, 2))
	d := allow(a, "h.test/h.test", 5, 2)
	assert.Greater(t, d, time.Duration(0))
	assert.LessOrEqual(t, d, 200*time.Millisecond)
	assert.Greater(t, allow(b, "h.test/h.test", 5, 2), time.Duration(0), "the other instance is refused too")
	time.Sleep(allow(b, "h.test/h.test", 5, 2))
	assert.Zero(t, allow(b, "h.test/h.test", 5, 2), "after the retry the store named")

	// Another host of the rule has a bucket of its own.
	assert.Zero(t, allow(a, "h.test/other.test", 5, 2))

	// 0.5r/s (30r/m): the next token two seconds on, not one or none.
	assert.Zero(t, allow(a, "slow/h.test", 0.5, 1))
	d = allow(b, "slow/h.test", 0.5, 1)
	assert.Greater(t, d, time.Second)
	assert.LessOrEqual(t, d, 2*time.Second)
}

func TestPassword(t *testing.T) {
	srv := startRedis(t, secret)
	for _, url := range []string{
		"redis://:wrong-" + secret + "@127.0.0.1:" + itoa(srv.port) + "/0",
		"redis://127.0.0.1:" + itoa(srv.port) + "/0",
	} {
		var log bytes.Buffer
		s := openStore(t, url, slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug})))
		_, err := s.Allow(context.Background(), "h.test/h.test", 5, 1)
		require.Error(t, err, Redact(url))
		assert.Contains(t, err.Error(), "redis refused the user name or password of -limit-store (", "a refusal, not a store that does not answer")
		assert.NotContains(t, err.Error(), secret)
		assert.NotContains(t, log.String(), secret)
	}
}

// A Redis that dies fails decisions, without the password in the error;
// started again, it serves them again.
func TestDownAndBack(t *testing.T) {
	srv := startRedis(t, secret)
	s := openStore(t, srv.URL(), nil)
	ctx := context.Background()
	_, err := s.Allow(ctx, "h.test/h.test", 100, 1)
	require.NoError(t, err)

	srv.stop()
	_, err = s.Allow(ctx, "h.test/h.test", 100, 1)
	require.Error(t, err)
	assert.NotContains(t, err.Error(), secret)
	// Within egressd's timeout, the cause rather than "context deadline
	// exceeded": the pool dials once, not five times 100ms apart.
	actx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
	defer cancel()
	_, err = s.Allow(actx, "h.test/h.test", 100, 1)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection refused")

	srv.restart()
	_, err = s.Allow(ctx, "h.test/h.test", 100, 1)
	require.NoError(t, err)
}

// A server that accepts and never answers fails the decision once the
// timeout is over.
func TestNoAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 100)
	defer func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	}()
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	s, err := Open("redis://"+ln.Addr().String()+"/0", 100*time.Millisecond, nil)
	require.NoError(t, err)
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	defer cancel()
	_, err = s.Allow(ctx, "h.test/h.test", 5, 1)
	require.Error(t, err)
	assert.NoError(t, ctx.Err(), "gave up by its own timeout, not the guard's")
}

// Through a shaper: a Redis that dies makes decisions in-process, and
// its return makes them shared again, as the statistics say.
func TestShaperFallsBackAndReturns(t *testing.T) {
	srv := startRedis(t, secret)
	store := openStore(t, srv.URL(), nil)
	var log syncBuffer
	shared := shape.NewShared(shape.SharedConfig{Store: store, Name: store.Name(), Retry: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	rule, err := shape.ParseRule("h.test=1000r/s,burst=1000")
	require.NoError(t, err)
	s, err := shape.New(shape.Config{Rules: []shape.Rule{rule}, Shared: shared})
	require.NoError(t, err)
	acquire := func() {
		t.Helper()
		p, err := s.Acquire(context.Background(), "h.test")
		require.NoError(t, err)
		p.Release()
	}

	acquire()
	assert.True(t, shared.Stats().Shared)
	srv.stop()
	acquire()
	st := shared.Stats()
	assert.False(t, st.Shared)
	assert.Equal(t, uint64(1), st.Fallbacks)
	assert.NotContains(t, st.LastError, secret)

	srv.restart()
	for end := time.Now().Add(guard); !shared.Stats().Shared; time.Sleep(10 * time.Millisecond) {
		require.True(t, time.Now().Before(end), "not shared again after %v", guard)
		acquire()
	}
	st = shared.Stats()
	assert.Equal(t, uint64(1), st.Fallbacks)
	assert.Positive(t, st.LocalDecisions)
	assert.Equal(t, 1, strings.Count(log.String(), "limit store fails"))
	assert.Equal(t, 1, strings.Count(log.String(), "limit store answers again"))
	assert.NotContains(t, log.String(), secret)
	assert.Contains(t, log.String(), "store=redis://:xxxxx@127.0.0.1:")
}
