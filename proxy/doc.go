// Package proxy is the protocol side of egressd: an HTTP/1.1 forward proxy
// that serves plain HTTP requests in absolute form and CONNECT tunnels, and
// a SOCKS5 server (ServeSOCKS5) whose CONNECTs are served as tunnels are.
//
// The package never touches the network configuration. Every upstream
// connection is opened through the dial function it is given (see
// Config.Dial), which binds the connection to a fresh egress address; the
// proxy only learns which address was used, for its access log, from the
// connection's local address, and, for its statistics, whether the
// connection left from the host's own IPv4 address instead (a connection
// whose DirectIPv4 method reports true, as egressd's dialer makes for a host
// with no IPv6 address).
//
// Every request, whatever its protocol, takes the same steps: admit the
// client, parse the target, pick the address, shape, dial, relay, record
// (request.go lists them; ServeHTTP, serveForward, serveConnect and
// serveSOCKS read as that list). Its state is one value, a request.
//
// Plain HTTP goes through github.com/elazarl/goproxy with a transport of our
// own (no upstream keep-alive, so every request leaves from a new address;
// verified TLS; no proxy from the environment), through a small adapter
// (goproxy.go). Config.Rotate changes what shares an address: each client
// connection (RotateConnection), or each session key, whose requests also
// reuse upstream keep-alive connections through a transport of the
// session's own (RotateSession; see rotate.go). CONNECT is handled here
// rather than by goproxy (see connect.go for why); its tunnels, and
// SOCKS5's, are relayed by package relay.
//
// Config.Access says who may use the proxy, for every protocol: the client
// networks admitted (403, or the SOCKS5 reply "not allowed by ruleset", for
// the others) and, with users (package auth), Basic proxy authentication or
// SOCKS5 user/password. Credentials never go upstream nor into the log.
// SetAccess and SetShaper replace the rules while the proxy runs, for a
// reload: each request reads them once, so requests in flight finish under
// the rules they started with (see access.go).
//
// Errors reach clients as a status and a one-line text that names only the
// host the client asked for, or as the SOCKS5 reply that says the same (see
// Error, and classify, the one place an upstream failure becomes one); the
// full error, which may contain the egress address, goes to the operator's
// log.
//
// Abuse is bounded (see Limits and Config.ClientTimeout): every client
// connection comes through a listener that counts it per client address and
// in total, backs off when file descriptors run out, and gives each HTTP
// read and write a deadline (clientconn.go); small request bodies are read
// before anything is dialed (body.go); requests net/http refuses by itself
// get egressd's answer and log line (malformed.go); failed logins are
// throttled per client address (login.go). Every refusal is counted by
// reason (Server.ClientStats).
package proxy
