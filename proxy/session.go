package proxy

import (
	"context"
	"strings"
)

// A session key groups requests that must leave from the same address (a
// login, a paged search, a video stream). It comes from the X-Egress-Session
// request header, or from a proxy user name "session-KEY" for clients that
// can only be given a proxy URL (http://session-build42:x@127.0.0.1:3128) or
// SOCKS5 credentials.

// SessionHeader carries a session key on HTTP requests and CONNECT; it is
// removed before a request is forwarded.
const SessionHeader = "X-Egress-Session"

// sessionUserPrefix starts a proxy user name that carries a session key.
const sessionUserPrefix = "session-"

type sessionKeyCtx struct{}

// withSession returns ctx carrying the session key (none when key is "").
func withSession(ctx context.Context, key string) context.Context {
	if key == "" {
		return ctx
	}
	return context.WithValue(ctx, sessionKeyCtx{}, key)
}

// sessionFrom returns the session key ctx carries, or "": the key of the
// session begun for it (beginSession), or the one withSession put in.
func sessionFrom(ctx context.Context) string {
	if sess := sessionOf(ctx); sess != nil {
		return sess.key
	}
	key, _ := ctx.Value(sessionKeyCtx{}).(string)
	return key
}

// sessionFromUser returns the session key in a proxy user name of the form
// "session-KEY", and whether there is one.
func sessionFromUser(user string) (string, bool) {
	key, ok := strings.CutPrefix(user, sessionUserPrefix)
	if !ok || key == "" {
		return "", false
	}
	return key, true
}
