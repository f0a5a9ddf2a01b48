package shape

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRuleFor(t *testing.T) {
	all := []string{
		"example.org=1r/s",
		"*.example.org=2r/s",
		"*.deep.example.org=3r/s",
		"*=4r/s",
		"Upper.Test=5r/s",
		"[2001:db8::1]=6r/s",
	}
	tests := []struct {
		name  string
		rules []string
		host  string
		want  string // the rule's Host; "" for none
	}{
		{"exact", all, "example.org", "example.org"},
		{"exact beats wildcard", all, "example.org", "example.org"},
		{"wildcard", all, "www.example.org", "*.example.org"},
		{"deeper name, shorter wildcard", all, "a.b.example.org", "*.example.org"},
		{"longer wildcard wins", all, "a.deep.example.org", "*.deep.example.org"},
		{"wildcard does not match its own suffix", all, "deep.example.org", "*.example.org"},
		{"star last", all, "other.net", "*"},
		{"star for a single label", all, "localhost", "*"},
		{"upper case", all, "WWW.Example.ORG", "*.example.org"},
		{"port", all, "example.org:443", "example.org"},
		{"trailing dot", all, "example.org.", "example.org"},
		{"all three", all, "Example.Org.:8443", "example.org"},
		{"rule written in upper case", all, "upper.test", "upper.test"},
		{"IPv6 literal", all, "[2001:db8::1]:443", "2001:db8::1"},
		{"no star: unshaped", []string{"*.example.org=1r/s"}, "other.net", ""},
		{"suffix itself is not matched", []string{"*.example.org=1r/s"}, "example.org", ""},
		{"not a label boundary", []string{"*.example.org=1r/s"}, "badexample.org", ""},
		{"no rules", nil, "example.org", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newShaper(t, nil, tt.rules...)
			r, ok := s.RuleFor(tt.host)
			assert.Equal(t, tt.want != "", ok)
			assert.Equal(t, tt.want, r.Host)
		})
	}
}

func TestNew(t *testing.T) {
	parse := func(s string) Rule {
		r, err := ParseRule(s)
		require.NoError(t, err)
		return r
	}
	tests := []struct {
		name  string
		rules []Rule
		err   string // "" for none
	}{
		{"good", []Rule{parse("a.test=1r/s"), parse("*.a.test=1r/s"), parse("*=1r/s")}, ""},
		{"two exact", []Rule{parse("a.test=1r/s"), parse("a.test=2r/s")}, `two rules for "a.test"`},
		{"two after normalizing", []Rule{parse("a.test=1r/s"), {Host: "A.Test.", Rate: 1, Burst: 1}}, `two rules for "a.test"`},
		{"two wildcards", []Rule{parse("*.a.test=1r/s"), parse("*.A.test=2r/s")}, `two rules for "*.a.test"`},
		{"two stars", []Rule{parse("*=1r/s"), parse("*=2r/s")}, `two rules for "*"`},
		{"zero rate", []Rule{{Host: "a.test", Burst: 1}}, `rule "a.test": rate 0`},
		{"zero burst", []Rule{{Host: "a.test", Rate: 1}}, `rule "a.test": burst 0`},
		{"negative concurrency", []Rule{{Host: "a.test", Rate: 1, Burst: 1, Concurrency: -1}}, `rule "a.test": concurrency -1`},
		{"negative wait", []Rule{{Host: "a.test", Rate: 1, Burst: 1, Wait: -time.Second}}, `rule "a.test": wait -1s`},
		{"bad host", []Rule{{Host: "a*.test", Rate: 1, Burst: 1}}, `rule "a*.test": host`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := New(Config{Rules: tt.rules})
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				return
			}
			require.NoError(t, err)
			got := s.Rules()
			assert.Equal(t, tt.rules, got)
			got[0].Host = "changed"
			assert.NotEqual(t, "changed", s.Rules()[0].Host, "Rules returns a copy")
		})
	}
}

// newShaper makes a Shaper of rules in the -limit form; clock nil is the
// system clock.
func newShaper(t testing.TB, clock Clock, rules ...string) *Shaper {
	t.Helper()
	return newShaperWith(t, Config{Clock: clock}, rules...)
}

// newShaperWith is newShaper with cfg's clock and Shared.
func newShaperWith(t testing.TB, cfg Config, rules ...string) *Shaper {
	t.Helper()
	for _, s := range rules {
		r, err := ParseRule(s)
		require.NoError(t, err)
		cfg.Rules = append(cfg.Rules, r)
	}
	s, err := New(cfg)
	require.NoError(t, err)
	return s
}
