package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"syscall"
	"testing"

	"github.com/egressd/egressd/netutil"
	"github.com/egressd/egressd/proxy/stats"
	"github.com/stretchr/testify/assert"
)

func TestUpstreamError(t *testing.T) {
	own := &Error{Status: http.StatusTeapot, Reason: "mine"}
	tests := []struct {
		name   string
		err    error
		status int
		reason string
	}{
		{"no address wrapped", fmt.Errorf("dialing: %w", opError(netutil.ErrNoAddress)), 503, "no fresh egress address available"},
		{"uplink down", fmt.Errorf("dialing: %w: %w", netutil.ErrNoAddress, &netutil.Unavailable{Reason: "uplink eth0 is down"}), 503, "no fresh egress address available: uplink eth0 is down"},
		{"no address beats timeout", errors.Join(context.DeadlineExceeded, netutil.ErrNoAddress), 503, "no fresh egress address available"},
		{"context deadline", fmt.Errorf("dialing: %w", context.DeadlineExceeded), 504, "upstream h.test timed out"},
		{"os deadline", opError(os.ErrDeadlineExceeded), 504, "upstream h.test timed out"},
		{"reset", opError(syscall.ECONNRESET), 502, "upstream h.test failed"},
		{"network unreachable", opError(syscall.ENETUNREACH), 502, "upstream h.test is unreachable"},
		{"ipv4 denied", fmt.Errorf("dialing h.test:80: %w", netutil.ErrNoIPv6), 502, "h.test has no IPv6 address"},
		{"no such host", &net.DNSError{Err: "no such host", Name: "h.test", IsNotFound: true}, 502, "cannot resolve h.test: no such host"},
		{"already mapped", fmt.Errorf("x: %w", own), http.StatusTeapot, "mine"},
		{"no file descriptors", opError(os.NewSyscallError("socket", syscall.EMFILE)), 503, "egressd has run out of file descriptors: try again later"},
		{"no file descriptors system-wide", opError(os.NewSyscallError("socket", syscall.ENFILE)), 503, "egressd has run out of file descriptors: try again later"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := classify("h.test", tt.err)
			assert.Equal(t, tt.status, e.Status)
			assert.Equal(t, tt.reason, e.Reason)
			assert.NotContains(t, e.body(), "2001:db8")
			assert.True(t, errors.Is(e, tt.err) || errors.Is(tt.err, e), "the cause stays reachable")
		})
	}
	e := classify("h.test", opError(syscall.EMFILE))
	assert.False(t, e.upstreamFault(), "running out of descriptors is egressd's limit, not the upstream's fault")
	assert.Equal(t, stats.RefusedFDsExhausted, e.refused)
	assert.Equal(t, typeConnLimit, e.Type)
}

func TestErrorText(t *testing.T) {
	e := &Error{Status: 502, Reason: "upstream h.test failed", Err: errBoom}
	assert.Equal(t, "upstream h.test failed: boom", e.Error())
	assert.ErrorIs(t, e, errBoom)
	assert.Equal(t, "upstream h.test failed\n", e.body())
	assert.Equal(t, "r", (&Error{Reason: "r"}).Error())
}
