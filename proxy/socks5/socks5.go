// Package socks5 reads and writes the server side of a SOCKS5 handshake:
// the method negotiation and CONNECT request of RFC 1928 and the
// user name/password subnegotiation of RFC 1929.
//
// It only parses and encodes messages; what to do with them (dialing,
// relaying, policy) is the caller's. Every read is exact, through
// io.ReadFull, so nothing the client sends after the handshake is consumed.
package socks5

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
)

// Protocol versions.
const (
	Version         = 0x05 // RFC 1928
	UserPassVersion = 0x01 // RFC 1929 subnegotiation
)

// Authentication methods (RFC 1928 section 3).
const (
	MethodNoAuth       = 0x00
	MethodUserPass     = 0x02
	MethodNoAcceptable = 0xff
)

// Commands (RFC 1928 section 4).
const (
	CmdConnect      = 0x01
	CmdBind         = 0x02
	CmdUDPAssociate = 0x03
)

// Address types (RFC 1928 section 4).
const (
	AtypIPv4   = 0x01
	AtypDomain = 0x03
	AtypIPv6   = 0x04
)

// Reply codes (RFC 1928 section 6).
const (
	ReplySucceeded           = 0x00
	ReplyGeneralFailure      = 0x01
	ReplyNotAllowed          = 0x02
	ReplyNetworkUnreachable  = 0x03
	ReplyHostUnreachable     = 0x04
	ReplyConnectionRefused   = 0x05
	ReplyTTLExpired          = 0x06
	ReplyCommandNotSupported = 0x07
	ReplyAddrNotSupported    = 0x08
)

// Errors returned for malformed messages. A *RequestError wraps them for a
// request, with the reply code the client should get.
var (
	ErrVersion   = errors.New("socks5: wrong protocol version")
	ErrNoMethods = errors.New("socks5: no authentication method offered")
	ErrMalformed = errors.New("socks5: malformed message")
)

// RequestError is a request the server cannot carry out, with the reply
// code to send before closing the connection.
type RequestError struct {
	Reply byte
	Err   error
}

func (e *RequestError) Error() string { return e.Err.Error() }
func (e *RequestError) Unwrap() error { return e.Err }

// ReadGreeting reads the client's version identifier/method selection
// message and returns the methods it offers. On an error the server should
// answer with WriteMethod(w, MethodNoAcceptable), if the connection still
// works, and close.
func ReadGreeting(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("socks5: reading greeting: %w", err)
	}
	if hdr[0] != Version {
		return nil, fmt.Errorf("%w %d in greeting", ErrVersion, hdr[0])
	}
	if hdr[1] == 0 {
		return nil, ErrNoMethods
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return nil, fmt.Errorf("socks5: reading %d methods: %w", hdr[1], err)
	}
	return methods, nil
}

// WriteMethod answers the greeting with the method chosen.
func WriteMethod(w io.Writer, method byte) error {
	_, err := w.Write([]byte{Version, method})
	return err
}

// ReadUserPass reads an RFC 1929 user name/password request. The user name
// must not be empty; the password may be (curl sends an empty one for
// "-U user:"). On an error the server should answer WriteUserPassStatus(w,
// false) and close.
func ReadUserPass(r io.Reader) (user, pass string, err error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "", "", fmt.Errorf("socks5: reading credentials: %w", err)
	}
	if hdr[0] != UserPassVersion {
		return "", "", fmt.Errorf("%w %d in credentials", ErrVersion, hdr[0])
	}
	if hdr[1] == 0 {
		return "", "", fmt.Errorf("%w: empty user name", ErrMalformed)
	}
	// The user name, then the password length: one read.
	buf := make([]byte, int(hdr[1])+1)
	if _, err := io.ReadFull(r, buf); err != nil {
		return "", "", fmt.Errorf("socks5: reading user name: %w", err)
	}
	user = string(buf[:hdr[1]])
	p := make([]byte, buf[hdr[1]])
	if _, err := io.ReadFull(r, p); err != nil {
		return "", "", fmt.Errorf("socks5: reading password: %w", err)
	}
	return user, string(p), nil
}

// WriteUserPassStatus answers the credentials: success, or failure (after
// which the server closes the connection).
func WriteUserPassStatus(w io.Writer, ok bool) error {
	status := byte(0x01)
	if ok {
		status = 0x00
	}
	_, err := w.Write([]byte{UserPassVersion, status})
	return err
}

// Request is a CONNECT request.
type Request struct {
	// Host is an IP address (IPv4 in dotted form, IPv6 unmapped) or, for
	// ATYP domain, the name exactly as sent, to be resolved by the server.
	Host string
	Port uint16
	// Domain is set when the client sent a name (ATYP 0x03).
	Domain bool
}

// Addr returns host:port for dialing.
func (q Request) Addr() string {
	return net.JoinHostPort(q.Host, strconv.Itoa(int(q.Port)))
}

// ReadRequest reads a request. Errors that the server should answer with a
// reply (wrong version, a command other than CONNECT, an unknown address
// type, an empty name, port 0) are *RequestError; an error reading
// (a truncated message) is returned as it is, and the server just closes.
func ReadRequest(r io.Reader) (Request, error) {
	var hdr [4]byte // VER CMD RSV ATYP
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Request{}, fmt.Errorf("socks5: reading request: %w", err)
	}
	if hdr[0] != Version {
		return Request{}, &RequestError{ReplyGeneralFailure, fmt.Errorf("%w %d in request", ErrVersion, hdr[0])}
	}
	// RSV (hdr[2]) must be zero; it is ignored, as most servers do.
	if hdr[1] != CmdConnect {
		// BIND and UDP ASSOCIATE, or garbage: the address is not read,
		// the connection is closed after the reply.
		return Request{}, &RequestError{ReplyCommandNotSupported, fmt.Errorf("socks5: command %#02x not supported", hdr[1])}
	}
	var q Request
	var addr []byte
	switch hdr[3] {
	case AtypIPv4:
		addr = make([]byte, 4+2)
	case AtypIPv6:
		addr = make([]byte, 16+2)
	case AtypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return Request{}, fmt.Errorf("socks5: reading name length: %w", err)
		}
		if n[0] == 0 {
			return Request{}, &RequestError{ReplyGeneralFailure, fmt.Errorf("%w: empty host name", ErrMalformed)}
		}
		addr = make([]byte, int(n[0])+2)
		q.Domain = true
	default:
		return Request{}, &RequestError{ReplyAddrNotSupported, fmt.Errorf("socks5: address type %#02x not supported", hdr[3])}
	}
	if _, err := io.ReadFull(r, addr); err != nil {
		return Request{}, fmt.Errorf("socks5: reading address: %w", err)
	}
	host, port := addr[:len(addr)-2], addr[len(addr)-2:]
	switch hdr[3] {
	case AtypIPv4:
		q.Host = netip.AddrFrom4([4]byte(host)).String()
	case AtypIPv6:
		q.Host = netip.AddrFrom16([16]byte(host)).Unmap().String()
	default:
		q.Host = string(host)
	}
	q.Port = uint16(port[0])<<8 | uint16(port[1])
	if q.Port == 0 {
		return Request{}, &RequestError{ReplyGeneralFailure, fmt.Errorf("%w: port 0", ErrMalformed)}
	}
	return q, nil
}

// WriteReply sends a reply with code rep. BND.ADDR and BND.PORT are always
// 0.0.0.0:0: the address a CONNECT is bound to is the egress address, which
// egressd never tells a client, and clients ignore these fields for CONNECT
// (curl, Firefox, Go's x/net/proxy all do).
func WriteReply(w io.Writer, rep byte) error {
	_, err := w.Write([]byte{Version, rep, 0x00, AtypIPv4, 0, 0, 0, 0, 0, 0})
	return err
}
