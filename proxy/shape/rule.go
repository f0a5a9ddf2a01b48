package shape

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.org/x/time/rate"
)

// Defaults of the options a rule may leave out.
const (
	defaultBurst = 1
	defaultWait  = 30 * time.Second
)

// ruleSyntax is the form of a rule, for error messages.
const ruleSyntax = "HOST=RATE[,burst=N][,concurrency=N][,wait=DURATION]"

// Rule is one -limit rule.
//
// A Rule from ParseRule remembers the unit its rate was written in, so that
// String gives "60r/m" back rather than "1r/s"; compare rules by their
// exported fields, not with ==.
type Rule struct {
	Host        string        // "aur.archlinux.org", "*.archlinux.org" or "*", lower-case
	Rate        rate.Limit    // events per second
	Burst       int           // tokens the bucket holds; at least 1
	Concurrency int           // requests in flight at once; 0: no cap
	Wait        time.Duration // longest a request waits for its turn

	// count and per are the rate as written: "60r/m" is 60 and 'm'. per is 0
	// for a Rule built in code, which String writes in r/s.
	count float64
	per   byte
}

// ParseRule reads a rule of the form
//
//	HOST=RATE[,burst=N][,concurrency=N][,wait=DURATION]
//
// where RATE is Nr/s, Nr/m or Nr/h as nginx writes it (N may have a
// fraction, "0.5r/s"). HOST is folded to lower case and loses a trailing dot.
// Options left out get their defaults: burst 1, no concurrency cap, wait 30s.
// Spaces around the parts are ignored. Every error is one line that quotes
// the rule and names the bad part.
func ParseRule(s string) (Rule, error) {
	bad := func(format string, args ...any) (Rule, error) {
		return Rule{}, fmt.Errorf("limit %q: %s", s, fmt.Sprintf(format, args...))
	}
	hostPart, rest, ok := strings.Cut(s, "=")
	if !ok {
		return bad("want %s", ruleSyntax)
	}
	host := strings.TrimSpace(hostPart)
	if host == "" {
		return bad("empty host")
	}
	h, err := ruleHost(host)
	if err != nil {
		return bad("host %q: %v", host, err)
	}
	parts := strings.Split(rest, ",")
	rateText := strings.TrimSpace(parts[0])
	if rateText == "" {
		return bad("missing rate")
	}
	count, per, err := parseRate(rateText)
	if err != nil {
		return bad("rate %q: %v", rateText, err)
	}
	if count/perSeconds(per) == 0 { // "0.000…1r/h": smaller than any float64
		return bad("rate %q: too small", rateText)
	}
	r := Rule{
		Host:  h,
		Rate:  rate.Limit(count / perSeconds(per)),
		Burst: defaultBurst,
		Wait:  defaultWait,
		count: count,
		per:   per,
	}
	var seenBurst, seenConc, seenWait bool
	for _, p := range parts[1:] {
		opt := strings.TrimSpace(p)
		if opt == "" {
			return bad("option %q is empty", p)
		}
		name, val, ok := strings.Cut(opt, "=")
		if !ok {
			return bad("option %q: want name=value", opt)
		}
		name, val = strings.TrimSpace(name), strings.TrimSpace(val)
		var seen *bool
		switch name {
		case "burst":
			seen = &seenBurst
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 {
				return bad("burst %q: must be an integer >= 1", val)
			}
			r.Burst = n
		case "concurrency":
			seen = &seenConc
			n, err := strconv.Atoi(val)
			if err != nil || n < 0 {
				return bad("concurrency %q: must be an integer >= 0", val)
			}
			r.Concurrency = n
		case "wait":
			seen = &seenWait
			d, err := time.ParseDuration(val)
			if err != nil {
				return bad("wait %q: not a duration such as 30s or 2m", val)
			}
			if d < 0 {
				return bad("wait %q: must not be negative", val)
			}
			r.Wait = d
		default:
			return bad("unknown option %q (want burst, concurrency or wait)", opt)
		}
		if *seen {
			return bad("duplicate option %q", name)
		}
		*seen = true
	}
	return r, nil
}

// String is the rule in the form ParseRule reads, with every option spelt
// out: "aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m0s".
func (r Rule) String() string {
	count, per := r.count, r.per
	if per == 0 || rate.Limit(count/perSeconds(per)) != r.Rate {
		count, per = float64(r.Rate), 's'
	}
	return fmt.Sprintf("%s=%sr/%c,burst=%d,concurrency=%d,wait=%s",
		r.Host, strconv.FormatFloat(count, 'f', -1, 64), per, r.Burst, r.Concurrency, r.Wait)
}

// validate checks a rule built in code as ParseRule would have, and returns
// it with its host normalized.
func (r Rule) validate() (Rule, error) {
	h, err := ruleHost(r.Host)
	if err != nil {
		return r, fmt.Errorf("rule %q: host: %w", r.Host, err)
	}
	r.Host = h
	switch {
	case math.IsNaN(float64(r.Rate)) || r.Rate <= 0 || math.IsInf(float64(r.Rate), 0):
		return r, fmt.Errorf("rule %q: rate %v: must be positive and finite", r.Host, float64(r.Rate))
	case r.Burst < 1:
		return r, fmt.Errorf("rule %q: burst %d: must be >= 1", r.Host, r.Burst)
	case r.Concurrency < 0:
		return r, fmt.Errorf("rule %q: concurrency %d: must be >= 0", r.Host, r.Concurrency)
	case r.Wait < 0:
		return r, fmt.Errorf("rule %q: wait %v: must not be negative", r.Host, r.Wait)
	}
	return r, nil
}

// ParseRate reads a rate as a rule writes it, Nr/s, Nr/m or Nr/h, and
// returns it in events a second. Its errors say what is wrong, without the
// text: the caller names the flag.
func ParseRate(s string) (float64, error) {
	count, per, err := parseRate(strings.TrimSpace(s))
	if err != nil {
		return 0, err
	}
	r := count / perSeconds(per)
	if r == 0 { // "0.000…1r/h": smaller than any float64
		return 0, errors.New("too small")
	}
	return r, nil
}

// parseRate reads "60r/m" as 60 and 'm'.
func parseRate(s string) (float64, byte, error) {
	num, unit, ok := strings.Cut(s, "r/")
	if !ok {
		return 0, 0, errors.New("want Nr/s, Nr/m or Nr/h")
	}
	if unit != "s" && unit != "m" && unit != "h" {
		return 0, 0, errors.New("unit must be s, m or h")
	}
	// Only plain decimals: ParseFloat would also take "1e3", "0x10", "Inf"
	// and "NaN".
	digits := strings.TrimPrefix(num, "-")
	if !isDecimal(digits) {
		return 0, 0, fmt.Errorf("bad number %q", num)
	}
	n, err := strconv.ParseFloat(digits, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("bad number %q", num)
	}
	if n == 0 || len(digits) < len(num) {
		return 0, 0, errors.New("must be positive")
	}
	return n, unit[0], nil
}

// isDecimal reports whether s is digits with at most one '.' among them.
func isDecimal(s string) bool {
	digits, dots := 0, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= '0' && c <= '9':
			digits++
		case c == '.':
			dots++
		default:
			return false
		}
	}
	return digits > 0 && dots <= 1
}

// perSeconds is the length of a rate's unit in seconds.
func perSeconds(per byte) float64 {
	switch per {
	case 'm':
		return 60
	case 'h':
		return 3600
	}
	return 1
}

// ruleHost checks and normalizes the host of a rule: "*", "*.suffix", a
// host name or an IP address.
func ruleHost(h string) (string, error) {
	h = strings.ToLower(h)
	if h == "*" {
		return h, nil
	}
	if name, ok := strings.CutPrefix(h, "*."); ok {
		name = strings.TrimSuffix(name, ".")
		switch {
		case strings.Contains(name, "*"):
			return "", errors.New(`'*' only as "*" or a leading "*."`)
		case name == "":
			return "", errors.New(`no name after "*."`)
		}
		return "*." + name, checkName(name)
	}
	if strings.Contains(h, "*") {
		return "", errors.New(`'*' only as "*" or a leading "*."`)
	}
	h = strings.TrimSuffix(h, ".")
	// An address with a zone (fe80::1%eth0) names an interface of this
	// host, not an upstream; and a zone may end in a space or a dot, which
	// the rule's String would not keep.
	if ip, ok := strings.CutPrefix(h, "["); ok {
		ip, ok = strings.CutSuffix(ip, "]")
		a, err := netip.ParseAddr(ip)
		switch {
		case !ok || err != nil:
			return "", errors.New("not an IP address in brackets")
		case a.Zone() != "":
			return "", errors.New("no zone allowed")
		}
		return ip, nil
	}
	if a, err := netip.ParseAddr(h); err == nil {
		if a.Zone() != "" {
			return "", errors.New("no zone allowed")
		}
		return h, nil
	}
	if strings.Contains(h, ":") {
		return "", errors.New("no port allowed")
	}
	return h, checkName(h)
}

// checkName checks a lower-case host name: labels of letters, digits, '-'
// and '_' between single dots.
func checkName(name string) error {
	for label := range strings.SplitSeq(name, ".") {
		if label == "" {
			return errors.New("empty label")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("bad character %q", c)
			}
		}
	}
	return nil
}

// NormHost returns a host name, or an address literal without brackets,
// as rules are matched against it and statistics key it: lower case,
// without a trailing dot. It takes no port (the proxy passes the host
// name a request names); the shaper's own methods, which may be given
// host:port, strip it first (normHost). It allocates only when the host
// has upper-case letters.
func NormHost(h string) string {
	h = strings.TrimSuffix(h, ".")
	for i := 0; i < len(h); i++ {
		if c := h[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(h)
		}
	}
	return h
}

// normHost is NormHost of a host that may carry a port: "host:port",
// "[v6]:port" or "[v6]" lose it; a bare IPv6 address (more than one colon)
// is kept whole.
func normHost(h string) string {
	if len(h) > 0 && h[0] == '[' {
		if i := strings.IndexByte(h, ']'); i > 0 {
			h = h[1:i]
		}
	} else if i := strings.LastIndexByte(h, ':'); i >= 0 && strings.IndexByte(h, ':') == i {
		h = h[:i] // one colon: a port; more: a bare IPv6 address
	}
	return NormHost(h)
}
