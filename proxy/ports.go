package proxy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Ports is a set of upstream TCP ports that clients may reach, written as a
// list of ports and ranges: "443,80" or "80,443,1024-65535". A port in
// BadPorts is in the set only when the list names it on its own, not when
// a range covers it, so that "1024-65535" does not open the way to an
// IRC or NFS server. The zero value is the empty set.
type Ports struct {
	bits [1 << 16 / 64]uint64
	spec string
}

// BadPorts are ports whose services speak protocols that an HTTP request,
// or bytes a client sends through a tunnel, can be smuggled into: the
// Fetch standard's list of bad ports, which browsers refuse for the same
// reason (mail, SSH, IRC, NFS, SIP, ...), and the text protocols of Redis
// and memcached. A range never covers them (see Ports).
var BadPorts = []uint16{
	1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95,
	101, 102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161,
	179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563,
	587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060,
	5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
	6379,  // Redis
	11211, // memcached
}

// The default port lists: tunnels (CONNECT and SOCKS5) to HTTPS and to
// plain HTTP (WebSocket, and SOCKS5 clients of http:// URLs), plain HTTP to
// the web's ports and every unprivileged one but the bad ones.
const (
	DefaultConnectPorts = "443,80"
	DefaultHTTPPorts    = "80,443,1024-65535"
)

// ParsePorts reads a port list: ports and ranges LOW-HIGH, separated by
// commas, each from 1 to 65535.
func ParsePorts(s string) (*Ports, error) {
	p := &Ports{}
	if err := p.add(s); err != nil {
		return nil, err
	}
	return p, nil
}

// MustParsePorts is ParsePorts for lists known to be good.
func MustParsePorts(s string) *Ports {
	p, err := ParsePorts(s)
	if err != nil {
		panic(err)
	}
	return p
}

// Add adds the ports of the list s, as ParsePorts reads it.
func (p *Ports) add(s string) error {
	if strings.TrimSpace(s) == "" {
		return fmt.Errorf("%q: want ports and ranges like 443,80,8000-8999", s)
	}
	var parts []string
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		lo, hi, isRange := strings.Cut(item, "-")
		a, err := parsePort(lo)
		if err != nil {
			return fmt.Errorf("%q: %w", s, err)
		}
		if !isRange {
			p.set(a)
			parts = append(parts, item)
			continue
		}
		b, err := parsePort(hi)
		if err != nil {
			return fmt.Errorf("%q: %w", s, err)
		}
		if b < a {
			return fmt.Errorf("%q: range %s ends before it starts", s, item)
		}
		for port := int(a); port <= int(b); port++ {
			if !slices.Contains(BadPorts, uint16(port)) {
				p.set(uint16(port))
			}
		}
		parts = append(parts, item)
	}
	if p.spec != "" {
		p.spec += ","
	}
	p.spec += strings.Join(parts, ",")
	return nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	return uint16(n), nil
}

func (p *Ports) set(port uint16) { p.bits[port/64] |= 1 << (port % 64) }

// Contains reports whether port is in the set. A nil *Ports is empty.
func (p *Ports) Contains(port uint16) bool {
	return p != nil && p.bits[port/64]&(1<<(port%64)) != 0
}

// String returns the list as it was given, without spaces.
func (p *Ports) String() string {
	if p == nil {
		return ""
	}
	return p.spec
}

// portOf returns the port of a host:port that a caller already checked.
func portOf(hostport string) uint16 {
	i := strings.LastIndexByte(hostport, ':')
	n, _ := strconv.ParseUint(hostport[i+1:], 10, 16)
	return uint16(n)
}
