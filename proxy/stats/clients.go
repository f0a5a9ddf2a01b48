package stats

import "sync/atomic"

// Refusal is why egressd refused a client or cut it off, for the counters of
// Clients and the reason label of egress_client_refused_total. The set is
// fixed, so that the exposition stays small whatever clients do.
type Refusal int

// The refusals, in the order the exposition lists them. The zero Refusal is
// none: it is never counted.
const (
	_ Refusal = iota
	// RefusedMaxConns: a connection past -max-conns, answered 503.
	RefusedMaxConns
	// RefusedMaxConnsPerClient: a connection past -max-conns-per-client.
	RefusedMaxConnsPerClient
	// RefusedMaxAddrsPerClient: a request or tunnel past
	// -max-addrs-per-client, answered 503.
	RefusedMaxAddrsPerClient
	// RefusedFDsExhausted: a connection accepted with the reserve file
	// descriptor while the process had none left, answered 503.
	RefusedFDsExhausted
	// RefusedHeaderTimeout: a request head (or SOCKS5 handshake) not
	// received within -client-timeout.
	RefusedHeaderTimeout
	// RefusedBodyTimeout: a request body that stalled for -client-timeout,
	// answered 408.
	RefusedBodyTimeout
	// RefusedWriteTimeout: a client that read nothing of its response for
	// -client-timeout; the response was aborted.
	RefusedWriteTimeout
	// RefusedMalformed: a request net/http or egressd could not take (a bad
	// request line, two Content-Lengths, a bad Transfer-Encoding, ...).
	RefusedMalformed
	// RefusedHeaderTooLarge: a request head over 64 KiB or 100 fields,
	// answered 431.
	RefusedHeaderTooLarge
	// RefusedBadBody: a malformed request body, or one that ended early,
	// answered 400.
	RefusedBadBody
	// RefusedLoginFailed: wrong credentials, answered 407 (HTTP) or with
	// the SOCKS5 failure status.
	RefusedLoginFailed
	// RefusedLoginThrottled: a login attempt from an address with too many
	// failures in a row, answered 429 without checking the password.
	RefusedLoginThrottled

	numRefusals
)

var refusalNames = [numRefusals]string{
	RefusedMaxConns:          "max_conns",
	RefusedMaxConnsPerClient: "max_conns_per_client",
	RefusedMaxAddrsPerClient: "max_addrs_per_client",
	RefusedFDsExhausted:      "fds_exhausted",
	RefusedHeaderTimeout:     "header_timeout",
	RefusedBodyTimeout:       "body_timeout",
	RefusedWriteTimeout:      "write_timeout",
	RefusedMalformed:         "malformed_request",
	RefusedHeaderTooLarge:    "header_too_large",
	RefusedBadBody:           "bad_body",
	RefusedLoginFailed:       "login_failed",
	RefusedLoginThrottled:    "login_throttled",
}

// String is the refusal's name: the key in ClientStats.Refused and the
// value of the reason label.
func (r Refusal) String() string { return nameOf(refusalNames[:], int(r)) }

func (r Refusal) valid() bool { return r > 0 && r < numRefusals }

// Refusals lists every refusal name, in the order of the constants.
var Refusals = refusalNames[1:]

// Clients holds the live counters about client connections. All fields are
// safe for concurrent use; the zero value is ready.
type Clients struct {
	Connections  atomic.Int64  // open client connections, HTTP and SOCKS5
	AcceptErrors atomic.Uint64 // failed accepts (file descriptors exhausted, ...)
	refused      [numRefusals]atomic.Uint64
}

// Refuse counts one refusal. The zero Refusal is not counted.
func (c *Clients) Refuse(r Refusal) {
	if r.valid() {
		c.refused[r].Add(1)
	}
}

// Refused returns the count of one refusal.
func (c *Clients) Refused(r Refusal) uint64 {
	if !r.valid() {
		return 0
	}
	return c.refused[r].Load()
}

// Snapshot returns the counters as the JSON of GET /stats carries them,
// with every refusal named, zeros included.
func (c *Clients) Snapshot() ClientStats {
	return ClientStats{
		Connections:  c.Connections.Load(),
		AcceptErrors: c.AcceptErrors.Load(),
		Refused:      countsByName(c.refused[:], refusalNames[:]),
	}
}

// ClientStats is the "clients" section of GET /stats.
type ClientStats struct {
	// Connections is the client connections open now.
	Connections int64 `json:"connections"`
	// Refused counts refusals by name (see Refusal); every name is there.
	Refused map[string]uint64 `json:"refused"`
	// AcceptErrors counts failed accepts.
	AcceptErrors uint64 `json:"accept_errors"`
}
