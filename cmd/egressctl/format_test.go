package main

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestHumanBytes(t *testing.T) {
	tests := []struct {
		n    uint64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1024*1024 - 1, "1.0 MiB"},
		{1258291, "1.2 MiB"},
		{5 << 30, "5.0 GiB"},
		{3 << 40, "3.0 TiB"},
		{7 << 50, "7.0 PiB"},
		{math.MaxUint64, "16.0 EiB"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, humanBytes(tt.n), "%d", tt.n)
	}
}

func TestHumanDuration(t *testing.T) {
	tests := []struct {
		s    float64
		want string
	}{
		{0, "0s"},
		{0.0000004, "0.4µs"},
		{0.0000085, "8.5µs"},
		{0.000085, "85µs"},
		{0.000155, "155µs"},
		{0.0009996, "1.00ms"},
		{0.00125, "1.25ms"},
		{0.0125, "12.5ms"},
		{0.35, "350ms"},
		{0.9996, "1.00s"},
		{2.5, "2.50s"},
		{12.34, "12.3s"},
		{59.96, "1m00s"},
		{192, "3m12s"},
		{3599.6, "1h00m"},
		{3661.5, "1h01m"},
		{7500, "2h05m"},
		{86399, "1d00h"},
		{3*86400 + 4*3600, "3d04h"},
		{-2.5, "-2.50s"},
		{math.NaN(), "?"},
		{math.Inf(1), "?"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, humanDuration(tt.s), "%v", tt.s)
	}
	assert.Equal(t, "-", humanLatency(0))
	assert.Equal(t, "155µs", humanLatency(0.000155))
}

func TestCell(t *testing.T) {
	assert.Equal(t, "-", cell(""))
	assert.Equal(t, "api.example.com", cell("api.example.com"))
	assert.Equal(t, "bücher.example", cell("bücher.example"))
	assert.Equal(t, "spa ce", cell("spa ce"))
	assert.Equal(t, `tab\there`, cell("tab\there"))
	assert.Equal(t, `new\nline`, cell("new\nline"))
	assert.Equal(t, `esc\x1b[2J`, cell("esc\x1b[2J"))
	assert.Equal(t, `bad\xff`, cell("bad\xff"))
}
