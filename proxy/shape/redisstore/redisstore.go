// Package redisstore keeps the budgets of egressd's -limit rules in Redis,
// so that every egressd naming the same store (-limit-store) shares them:
// the shape.Store of a shape.Shared.
//
// The limiter is GCRA as github.com/go-redis/redis_rate runs it: one Lua
// script per decision, one key per rule and upstream host holding the
// bucket's theoretical arrival time, and Redis's own clock (TIME), so the
// clocks of the egressd hosts do not matter. A rule's rate of r a second is
// given to it as one request per 1/r, which keeps rates such as 0.5r/s or
// 60r/m exact.
package redisstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/proxy/shape"
)

// Syntax is the form of a store URL, for error messages and usage.
const Syntax = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], or rediss://... for TLS"

// defaultPort is Redis's port, for a URL without one.
const defaultPort = "6379"

// keyPrefix starts every key egressd keeps (after redis_rate's "rate:").
const keyPrefix = "egressd:"

// ParseURL checks a store URL: scheme redis, or rediss for TLS; a host; an
// optional port, user and password, and database number. Its errors never
// quote the URL, which may hold a password.
func ParseURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		var ue *url.Error
		var esc url.EscapeError
		switch {
		case errors.As(err, &esc):
			err = errors.New("a bad %-escape") // it would quote part of the URL
		case errors.As(err, &ue) && strings.Contains(ue.Err.Error(), `"`):
			// It quotes part of the URL: the port or host it could not
			// read, which is the start of a password holding / ? or #
			// (the authority ends there).
			err = errors.New("a host or port that does not parse; a password holding / ? # or @ must be %-escaped")
		case errors.As(err, &ue):
			err = ue.Err // without the URL
		}
		return nil, fmt.Errorf("not a URL (%v): want %s", err, Syntax)
	}
	switch {
	case u.Scheme != "redis" && u.Scheme != "rediss":
		return nil, fmt.Errorf("scheme %q: want %s", u.Scheme, Syntax)
	case u.Opaque != "" || u.Host == "":
		return nil, fmt.Errorf("no host: want %s", Syntax)
	case u.Hostname() == "":
		return nil, fmt.Errorf("empty host: want %s", Syntax)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return nil, fmt.Errorf("no query or fragment allowed: want %s", Syntax)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			return nil, fmt.Errorf("port %q: must be a number from 1 to 65535", p)
		}
	}
	if _, err := database(u); err != nil {
		return nil, err
	}
	return u, nil
}

// database is the database number of a URL's path: "", "/" or "/N".
func database(u *url.URL) (int, error) {
	p := strings.TrimPrefix(u.Path, "/")
	if p == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 0 || strings.HasPrefix(p, "+") {
		return 0, fmt.Errorf("database %q: must be a number of at least 0 (the path of %s)", p, Syntax)
	}
	return n, nil
}

// Redact returns a store URL as logs and statistics show it: with any
// password replaced by "xxxxx". A URL that does not parse is shown as
// "(invalid)".
func Redact(s string) string {
	u, err := ParseURL(s)
	if err != nil {
		return "(invalid)"
	}
	return u.Redacted()
}

// Store is a shape.Store in Redis. It connects on first use and again
// after the connection broke, so a Redis that is down when egressd starts,
// or restarts later, is taken up when it answers.
type Store struct {
	rdb    *redis.Client
	lim    *redis_rate.Limiter
	name   string // the URL, redacted
	secret string // the password, never to appear in an error
}

var _ shape.Store = (*Store)(nil)

// Open returns a Store for the URL s (see ParseURL). Every connection, read
// and write gives up after timeout. It does not connect yet. log, when not
// nil, gets the Redis client's own messages at debug level, without the
// password; Open sets it for the whole process (go-redis has one logger).
func Open(s string, timeout time.Duration, log *slog.Logger) (*Store, error) {
	u, err := ParseURL(s)
	if err != nil {
		return nil, err
	}
	db, _ := database(u) // checked by ParseURL
	port := u.Port()
	if port == "" {
		port = defaultPort
	}
	password, _ := u.User.Password()
	opt := &redis.Options{
		Addr:         net.JoinHostPort(u.Hostname(), port),
		Username:     u.User.Username(),
		Password:     password,
		DB:           db,
		DialTimeout:  timeout,
		ReadTimeout:  timeout,
		WriteTimeout: timeout,
		// No CLIENT SETINFO nor CLIENT MAINT_NOTIFICATIONS on connect:
		// older servers refuse them, and egressd needs neither.
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
		// One dial a call: the pool's default of five, 100ms apart,
		// outlasts egressd's timeout, which then reported "context
		// deadline exceeded" for a Redis that refuses connections.
		// egressd tries the store again every second by itself.
		DialerRetries: 1,
	}
	if u.Scheme == "rediss" {
		opt.TLSConfig = &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12}
	}
	st := &Store{name: u.Redacted(), secret: password}
	if log != nil {
		redis.SetLogger(clientLog{log: log, scrub: st.scrub})
	}
	st.rdb = redis.NewClient(opt)
	st.lim = redis_rate.NewLimiter(st.rdb)
	return st, nil
}

// Name is the store's URL without its password.
func (s *Store) Name() string { return s.name }

// Close closes the connections to Redis.
func (s *Store) Close() error { return s.rdb.Close() }

// Allow takes a token of key's bucket, which holds burst tokens and gains r
// a second. It returns 0 when it took one, else how long until there is
// one.
func (s *Store) Allow(ctx context.Context, key string, r rate.Limit, burst int) (time.Duration, error) {
	res, err := s.lim.Allow(ctx, keyPrefix+key, redis_rate.Limit{Rate: 1, Burst: burst, Period: interval(r)})
	if err != nil {
		msg := s.scrub(err.Error())
		if isAuthError(msg) {
			msg = "redis refused the user name or password of -limit-store (" + msg + ")"
		}
		return 0, storeError(msg)
	}
	if res.Allowed > 0 {
		return 0, nil
	}
	return max(res.RetryAfter, time.Microsecond), nil
}

// interval is the time between two tokens at r a second: redis_rate takes
// a rate as a whole number of requests a period, and one request an
// interval is r exactly.
func interval(r rate.Limit) time.Duration {
	ns := float64(time.Second) / float64(r)
	if ns >= math.MaxInt64 {
		return math.MaxInt64
	}
	return max(time.Duration(ns), 1)
}

// scrub takes the password out of a message, should a server or the client
// library ever repeat it.
func (s *Store) scrub(msg string) string {
	if s.secret == "" {
		return msg
	}
	return strings.ReplaceAll(msg, s.secret, "xxxxx")
}

// isAuthError reports whether a Redis error refuses the credentials: a wrong
// password, none where one is needed, or a user without the rights.
func isAuthError(msg string) bool {
	for _, code := range []string{"WRONGPASS", "NOAUTH", "NOPERM"} {
		if strings.HasPrefix(msg, code+" ") {
			return true
		}
	}
	return false
}

// storeError is an error of the store, scrubbed.
type storeError string

func (e storeError) Error() string { return string(e) }

// clientLog passes go-redis's own messages to egressd's log.
type clientLog struct {
	log   *slog.Logger
	scrub func(string) string
}

func (l clientLog) Printf(ctx context.Context, format string, v ...any) {
	l.log.Debug("redis client", "detail", l.scrub(strings.TrimSpace(fmt.Sprintf(format, v...))))
}
