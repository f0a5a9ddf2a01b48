package main

import (
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestUsageRuns: egressd -h prints every flag, the new ones included.
func TestUsageRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds egressd")
	}
	out, err := exec.Command("go", "run", ".", "-h").CombinedOutput()
	require.NoError(t, err, "%s", out)
	for _, f := range []string{"-allow CIDR", "-auth-file FILE", "loopback only"} {
		assert.Contains(t, string(out), f)
	}
}
