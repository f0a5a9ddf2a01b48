package shape

import (
	"math"
	"strconv"
	"strings"
	"testing"
)

// FuzzParseRule feeds -limit rules through ParseRule (the seeds, in
// testdata/fuzz, have every option, rate unit and host form). An error is
// one line quoting the rule; a rule it accepts is one validate accepts, with
// a positive finite rate, and its String parses back to the same rule and
// the same String.
func FuzzParseRule(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			msg := err.Error()
			if !strings.HasPrefix(msg, "limit "+strconv.Quote(s)+": ") || strings.Contains(msg, "\n") {
				t.Fatalf("error %q", msg)
			}
			return
		}
		if rate := float64(r.Rate); !(rate > 0) || math.IsInf(rate, 0) || r.Burst < 1 || r.Concurrency < 0 || r.Wait < 0 {
			t.Fatalf("%q: accepted %+v", s, r)
		}
		if v, err := r.validate(); err != nil || v.Host != r.Host {
			t.Fatalf("%q: accepted %+v, which validate makes %+v, %v", s, r, v, err)
		}
		if strings.ToLower(r.Host) != r.Host {
			t.Fatalf("%q: host %q", s, r.Host)
		}
		str := r.String()
		again, err := ParseRule(str)
		if err != nil {
			t.Fatalf("%q: String %q does not parse: %v", s, str, err)
		}
		if again.Host != r.Host || again.Rate != r.Rate || again.Burst != r.Burst ||
			again.Concurrency != r.Concurrency || again.Wait != r.Wait || again.String() != str {
			t.Fatalf("%q: %+v; its String %q parses as %+v", s, r, str, again)
		}
	})
}
