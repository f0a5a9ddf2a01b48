package shape

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"
)

func TestParseRule(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want Rule // exported fields only
		str  string
	}{
		{"issue example", "aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m",
			Rule{Host: "aur.archlinux.org", Rate: 1, Burst: 10, Concurrency: 4, Wait: 2 * time.Minute},
			"aur.archlinux.org=60r/m,burst=10,concurrency=4,wait=2m0s"},
		{"defaults", "h.test=5r/s",
			Rule{Host: "h.test", Rate: 5, Burst: 1, Wait: 30 * time.Second},
			"h.test=5r/s,burst=1,concurrency=0,wait=30s"},
		{"per hour", "h.test=7r/h",
			Rule{Host: "h.test", Rate: rate.Limit(7.0 / 3600), Burst: 1, Wait: 30 * time.Second},
			"h.test=7r/h,burst=1,concurrency=0,wait=30s"},
		{"decimal", "h.test=0.5r/s",
			Rule{Host: "h.test", Rate: 0.5, Burst: 1, Wait: 30 * time.Second},
			"h.test=0.5r/s,burst=1,concurrency=0,wait=30s"},
		{"decimal per minute", "h.test=1.25r/m",
			Rule{Host: "h.test", Rate: rate.Limit(1.25 / 60), Burst: 1, Wait: 30 * time.Second},
			"h.test=1.25r/m,burst=1,concurrency=0,wait=30s"},
		{"options in any order", "h.test=2r/s,wait=0,concurrency=1,burst=3",
			Rule{Host: "h.test", Rate: 2, Burst: 3, Concurrency: 1, Wait: 0},
			"h.test=2r/s,burst=3,concurrency=1,wait=0s"},
		{"spaces around parts", " h.test = 2r/s , burst = 3 , wait=1s ",
			Rule{Host: "h.test", Rate: 2, Burst: 3, Wait: time.Second},
			"h.test=2r/s,burst=3,concurrency=0,wait=1s"},
		{"host folded, trailing dot dropped", "Aur.ArchLinux.ORG.=1r/s",
			Rule{Host: "aur.archlinux.org", Rate: 1, Burst: 1, Wait: 30 * time.Second},
			"aur.archlinux.org=1r/s,burst=1,concurrency=0,wait=30s"},
		{"star", "*=10r/s",
			Rule{Host: "*", Rate: 10, Burst: 1, Wait: 30 * time.Second},
			"*=10r/s,burst=1,concurrency=0,wait=30s"},
		{"wildcard", "*.X.y=3r/m",
			Rule{Host: "*.x.y", Rate: 0.05, Burst: 1, Wait: 30 * time.Second},
			"*.x.y=3r/m,burst=1,concurrency=0,wait=30s"},
		{"IPv6 in brackets", "[2001:DB8::1]=1r/s",
			Rule{Host: "2001:db8::1", Rate: 1, Burst: 1, Wait: 30 * time.Second},
			"2001:db8::1=1r/s,burst=1,concurrency=0,wait=30s"},
		{"underscore label", "_dmarc.h.test=1r/s",
			Rule{Host: "_dmarc.h.test", Rate: 1, Burst: 1, Wait: 30 * time.Second},
			"_dmarc.h.test=1r/s,burst=1,concurrency=0,wait=30s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRule(tt.in)
			require.NoError(t, err)
			assert.Equal(t, tt.want.Host, r.Host)
			assert.InDelta(t, float64(tt.want.Rate), float64(r.Rate), 1e-15)
			assert.Equal(t, tt.want.Burst, r.Burst)
			assert.Equal(t, tt.want.Concurrency, r.Concurrency)
			assert.Equal(t, tt.want.Wait, r.Wait)
			assert.Equal(t, tt.str, r.String())

			back, err := ParseRule(r.String())
			require.NoError(t, err, "String reads back")
			assert.Equal(t, r, back, "round trip")
		})
	}
}

func TestParseRuleErrors(t *testing.T) {
	tests := []struct {
		name string
		in   string
		bad  string // the part the error must name
	}{
		{"no equals", "aur.archlinux.org", "want HOST=RATE"},
		{"empty host", "=1r/s", "empty host"},
		{"blank host", "   =1r/s", "empty host"},
		{"star inside", "a*.b=1r/s", `host "a*.b": '*' only as "*" or a leading "*."`},
		{"star in label", "*a.b=1r/s", `host "*a.b": '*' only`},
		{"star later", "a.*.b=1r/s", `host "a.*.b": '*' only`},
		{"two stars", "*.*.b=1r/s", `host "*.*.b": '*' only`},
		{"double star", "**=1r/s", `host "**": '*' only`},
		{"star dot only", "*.=1r/s", `host "*.": no name after "*."`},
		{"empty label", "a..b=1r/s", `host "a..b": empty label`},
		{"space in host", "a b=1r/s", `host "a b": bad character ' '`},
		{"port", "h.test:443=1r/s", `host "h.test:443": no port allowed`},
		{"zone", "[fe80::1%eth0]=1r/s", `host "[fe80::1%eth0]": no zone allowed`},
		{"zone unbracketed", "fe80::1%eth0=1r/s", `host "fe80::1%eth0": no zone allowed`},
		{"bad brackets", "[h.test]=1r/s", `host "[h.test]": not an IP address`},
		{"missing rate", "h.test=", "missing rate"},
		{"blank rate", "h.test=  ,burst=2", "missing rate"},
		{"no r/", "h.test=60", `rate "60": want Nr/s, Nr/m or Nr/h`},
		{"bad unit", "aur.archlinux.org=60r/d", `rate "60r/d": unit must be s, m or h`},
		{"empty unit", "h.test=60r/", `rate "60r/": unit must be s, m or h`},
		{"bad number", "h.test=xr/s", `rate "xr/s": bad number "x"`},
		{"no number", "h.test=r/s", `rate "r/s": bad number ""`},
		{"exponent", "h.test=1e3r/s", `rate "1e3r/s": bad number "1e3"`},
		{"inf", "h.test=infr/s", `rate "infr/s": bad number "inf"`},
		{"two dots", "h.test=1.2.3r/s", `rate "1.2.3r/s": bad number "1.2.3"`},
		{"too big", "h.test=" + strings.Repeat("9", 400) + "r/s", `bad number "999`},
		{"zero", "h.test=0r/s", `rate "0r/s": must be positive`},
		{"zero decimal", "h.test=0.0r/m", `rate "0.0r/m": must be positive`},
		{"negative", "h.test=-1r/s", `rate "-1r/s": must be positive`},
		{"too small", "h.test=0." + strings.Repeat("0", 322) + "5r/h", `: too small`},
		{"unknown option", "h.test=1r/s,foo=1", `unknown option "foo=1"`},
		{"option without equals", "h.test=1r/s,burst", `option "burst": want name=value`},
		{"duplicate option", "h.test=1r/s,burst=2,burst=3", `duplicate option "burst"`},
		{"duplicate wait", "h.test=1r/s,wait=1s,wait=1s", `duplicate option "wait"`},
		{"burst zero", "h.test=1r/s,burst=0", `burst "0": must be an integer >= 1`},
		{"burst fraction", "h.test=1r/s,burst=1.5", `burst "1.5": must be an integer >= 1`},
		{"burst empty", "h.test=1r/s,burst=", `burst "": must be an integer >= 1`},
		{"concurrency negative", "h.test=1r/s,concurrency=-1", `concurrency "-1": must be an integer >= 0`},
		{"concurrency word", "h.test=1r/s,concurrency=many", `concurrency "many": must be an integer >= 0`},
		{"wait not a duration", "h.test=1r/s,wait=5x", `wait "5x": not a duration`},
		{"wait without unit", "h.test=1r/s,wait=5", `wait "5": not a duration`},
		{"wait negative", "h.test=1r/s,wait=-1s", `wait "-1s": must not be negative`},
		{"empty option", "h.test=1r/s,,burst=2", `option "" is empty`},
		{"blank option", "h.test=1r/s, ", `option " " is empty`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseRule(tt.in)
			require.Error(t, err)
			msg := err.Error()
			assert.Contains(t, msg, `limit "`+tt.in+`": `, "names the rule")
			assert.Contains(t, msg, tt.bad, "names the bad part")
			assert.NotContains(t, msg, "\n")
		})
	}
}

func TestRuleStringBuiltInCode(t *testing.T) {
	r := Rule{Host: "h.test", Rate: 2.5, Burst: 4, Wait: time.Second}
	assert.Equal(t, "h.test=2.5r/s,burst=4,concurrency=0,wait=1s", r.String())

	// A parsed rule whose Rate was changed afterwards is written in r/s.
	p, err := ParseRule("h.test=60r/m")
	require.NoError(t, err)
	p.Rate = 3
	assert.Equal(t, "h.test=3r/s,burst=1,concurrency=0,wait=30s", p.String())
}

func TestNormHost(t *testing.T) {
	tests := []struct{ in, want string }{
		{"example.org", "example.org"},
		{"Example.ORG", "example.org"},
		{"example.org:443", "example.org"},
		{"example.org.", "example.org"},
		{"EXAMPLE.org.:8080", "example.org"},
		{"[2001:db8::1]:443", "2001:db8::1"},
		{"[2001:db8::1]", "2001:db8::1"},
		{"2001:db8::1", "2001:db8::1"},
		{"", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			assert.Equal(t, tt.want, normHost(tt.in))
		})
	}
	assert.Zero(t, testing.AllocsPerRun(100, func() { normHost("www.example.org:443") }))
}

func TestCeilSeconds(t *testing.T) {
	tests := []struct{ in, want time.Duration }{
		{0, time.Second},
		{-time.Second, time.Second},
		{time.Nanosecond, time.Second},
		{time.Second, time.Second},
		{time.Second + time.Nanosecond, 2 * time.Second},
		{1500 * time.Millisecond, 2 * time.Second},
		{2 * time.Minute, 2 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.in.String(), func(t *testing.T) {
			assert.Equal(t, tt.want, ceilSeconds(tt.in))
		})
	}
	huge := ceilSeconds(rate.InfDuration)
	assert.Positive(t, huge)
	assert.Zero(t, huge%time.Second)
}
