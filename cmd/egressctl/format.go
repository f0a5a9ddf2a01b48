package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// humanBytes formats n in IEC units: 512 B, 1.2 MiB.
func humanBytes(n uint64) string {
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	v := float64(n)
	for _, unit := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= 1024
		if v < 1023.95 { // so that it never prints 1024.0
			return fmt.Sprintf("%.1f %s", v, unit)
		}
	}
	return fmt.Sprintf("%.1f EiB", v/1024)
}

// humanDuration formats seconds with about three significant digits in the
// unit that suits it: 85µs, 1.25ms, 350ms, 2.50s, 3m12s, 2h05m, 3d04h.
func humanDuration(seconds float64) string {
	switch {
	case math.IsNaN(seconds) || math.IsInf(seconds, 0):
		return "?"
	case seconds < 0:
		return "-" + humanDuration(-seconds)
	case seconds == 0:
		return "0s"
	}
	// Round in the unit chosen, then move up if rounding reached the next.
	if us := seconds * 1e6; us < 999.5 {
		if us < 9.95 {
			return fmt.Sprintf("%.1fµs", us)
		}
		return fmt.Sprintf("%.0fµs", us)
	}
	if ms := seconds * 1e3; ms < 999.5 {
		switch {
		case ms < 9.995:
			return fmt.Sprintf("%.2fms", ms)
		case ms < 99.95:
			return fmt.Sprintf("%.1fms", ms)
		}
		return fmt.Sprintf("%.0fms", ms)
	}
	if seconds < 59.95 {
		if seconds < 9.995 {
			return fmt.Sprintf("%.2fs", seconds)
		}
		return fmt.Sprintf("%.1fs", seconds)
	}
	s := int64(math.Round(seconds))
	switch {
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		m := (s + 30) / 60
		if m < 24*60 {
			return fmt.Sprintf("%dh%02dm", m/60, m%60)
		}
	}
	h := (s + 1800) / 3600
	return fmt.Sprintf("%dd%02dh", h/24, h%24)
}

// humanLatency is humanDuration, with "-" for no data (a quantile of an
// empty histogram is 0).
func humanLatency(seconds float64) string {
	if seconds == 0 {
		return "-"
	}
	return humanDuration(seconds)
}

// cell makes s fit a table cell: "-" when empty (a blank cell shifts the
// eye), and control characters, which a host name from a client may hold
// and of which a tab would shift the columns, escaped as in Go strings.
func cell(s string) string {
	if s == "" {
		return "-"
	}
	odd := func(r rune) bool { return r == utf8.RuneError || !unicode.IsGraphic(r) }
	if strings.IndexFunc(s, odd) < 0 {
		return s
	}
	q := strconv.QuoteToGraphic(s)
	return q[1 : len(q)-1]
}

// writeIndented writes the JSON document b indented, as received otherwise.
func writeIndented(w io.Writer, b []byte) error {
	var buf bytes.Buffer
	// TrimSpace: Indent keeps the newline a json.Encoder ends with.
	if err := json.Indent(&buf, bytes.TrimSpace(b), "", "  "); err != nil {
		return fmt.Errorf("egressd sent invalid JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err := w.Write(buf.Bytes())
	return err
}

// isTerminal reports whether f is a terminal: a character device. Of the
// others, only /dev/null is common, where clearing the screen is harmless.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
