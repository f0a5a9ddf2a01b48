package admin

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestAdminAddress(t *testing.T) {
	tests := []struct {
		admin string
		tcp   bool
		base  string
	}{
		{"/run/egressd/admin.sock", false, "http://egressd"},
		{"./admin.sock", false, "http://egressd"},
		{"admin.sock", false, "http://egressd"},
		{"./odd:name.sock", false, "http://egressd"},
		{"/tmp/odd:name.sock", false, "http://egressd"},
		{"127.0.0.1:9090", true, "http://127.0.0.1:9090"},
		{"[::1]:9090", true, "http://[::1]:9090"},
		{"localhost:9090", true, "http://localhost:9090"},
		{"http://localhost:9090/", true, "http://localhost:9090"},
	}
	for _, tt := range tests {
		t.Run(tt.admin, func(t *testing.T) {
			c := NewClient(tt.admin)
			assert.Equal(t, tt.tcp, !IsUnix(tt.admin))
			assert.Equal(t, tt.base, c.base)
			tr := c.hc.Transport.(*http.Transport)
			assert.Nil(t, tr.Proxy, "never through HTTP(S)_PROXY, which may be egressd itself")
			assert.Equal(t, !tt.tcp, tr.DialContext != nil)
		})
	}
}
