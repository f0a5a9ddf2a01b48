package shape

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Hosts of bigShaper's rules, matched exactly, by a wildcard (walking three
// dots first) and by "*".
const (
	exactHost    = "host250.example250.test"
	wildcardHost = "a.b.www.zone250.test"
	starHost     = "unlisted.example.net"
)

// bigShaper has 1,000 rules on the system clock: 500 exact hosts, 499
// wildcards with a concurrency cap, and "*", all with a rate so high that a
// token is always there.
func bigShaper(tb testing.TB) *Shaper {
	tb.Helper()
	var rules []Rule
	for i := range 500 {
		rules = append(rules, Rule{Host: fmt.Sprintf("host%d.example%d.test", i, i), Rate: 1e9, Burst: 1e9, Wait: time.Second})
	}
	for i := range 499 {
		rules = append(rules, Rule{Host: fmt.Sprintf("*.zone%d.test", i), Rate: 1e9, Burst: 1e9, Concurrency: 1000, Wait: time.Second})
	}
	rules = append(rules, Rule{Host: "*", Rate: 1e9, Burst: 1e9, Wait: time.Second})
	s, err := New(Config{Rules: rules})
	require.NoError(tb, err)
	return s
}

func TestFastPathAllocs(t *testing.T) {
	s := bigShaper(t)
	ctx := context.Background()
	tests := []struct{ name, host, rule string }{
		{"exact", exactHost, exactHost},
		{"wildcard", wildcardHost, "*.zone250.test"},
		{"star", starHost, "*"},
		{"port and trailing dot", exactHost + ".:443", exactHost},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, ok := s.RuleFor(tt.host)
			require.True(t, ok)
			require.Equal(t, tt.rule, r.Host)
			assert.Zero(t, testing.AllocsPerRun(1000, func() { s.RuleFor(tt.host) }), "RuleFor")
			assert.Zero(t, testing.AllocsPerRun(1000, func() {
				p, err := s.Acquire(ctx, tt.host)
				if err != nil || p.Rule() != tt.rule {
					panic(fmt.Sprint("not let through: ", err))
				}
				p.Release()
			}), "Acquire and Release")
		})
	}
}

func BenchmarkRuleForExact(b *testing.B) {
	s := bigShaper(b)
	b.ReportAllocs()
	for b.Loop() {
		s.RuleFor(exactHost)
	}
}

func BenchmarkRuleForWildcard(b *testing.B) {
	s := bigShaper(b)
	b.ReportAllocs()
	for b.Loop() {
		s.RuleFor(wildcardHost)
	}
}

func BenchmarkAcquireFast(b *testing.B) {
	for _, host := range []string{exactHost, wildcardHost} {
		b.Run(host, func(b *testing.B) {
			s := bigShaper(b)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				p, err := s.Acquire(ctx, host)
				if err != nil {
					b.Fatal(err)
				}
				p.Release()
			}
		})
	}
}
