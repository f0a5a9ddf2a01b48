package auth

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/bcrypt"
)

// hash returns a bcrypt hash of pass at the lowest cost, with prefix ("$2y$",
// "$2a$" or "$2b$") in place of the one bcrypt writes.
func hash(t testing.TB, pass, prefix string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	require.NoError(t, err)
	return prefix + string(h[4:])
}

func TestParse(t *testing.T) {
	y, a, b := hash(t, "pw-y", "$2y$"), hash(t, "pw-a", "$2a$"), hash(t, "pw-b", "$2b$")
	file := "# users of egressd\n\n" +
		"alice:" + y + "\n" +
		"  \t\n" +
		"bob:" + a + "\r\n" + // CRLF, as an editor on another system may leave
		"   # indented comment\n" +
		"carol:" + b // no final newline
	u, err := Parse(strings.NewReader(file), "users")
	require.NoError(t, err)
	assert.Equal(t, 3, u.Len())
	assert.True(t, u.Verify("alice", "pw-y"), "$2y$")
	assert.True(t, u.Verify("bob", "pw-a"), "$2a$")
	assert.True(t, u.Verify("carol", "pw-b"), "$2b$")
	assert.False(t, u.Verify("alice", "pw-a"), "another user's password")
	assert.False(t, u.Verify("alice", ""), "empty password")
	assert.False(t, u.Verify("dave", "pw-y"), "unknown user")
	assert.False(t, u.Verify("Alice", "pw-y"), "user names are case-sensitive")

	empty, err := Parse(strings.NewReader("# nobody yet\n"), "users")
	require.NoError(t, err)
	assert.Zero(t, empty.Len())
	assert.False(t, empty.Verify("alice", "pw-y"))
}

func TestWeak(t *testing.T) {
	h10, err := bcrypt.GenerateFromPassword([]byte("pw"), 10)
	require.NoError(t, err)
	u, err := Parse(strings.NewReader("zed:"+hash(t, "pw", "$2y$")+"\nbob:"+string(h10)+"\namy:"+hash(t, "pw", "$2a$")+"\n"), "users")
	require.NoError(t, err)
	weak, cost := u.Weak()
	assert.Equal(t, []string{"amy", "zed"}, weak, "sorted")
	assert.Equal(t, bcrypt.MinCost, cost)

	strong, err := Parse(strings.NewReader("bob:"+string(h10)+"\n"), "users")
	require.NoError(t, err)
	weak, cost = strong.Weak()
	assert.Empty(t, weak)
	assert.Zero(t, cost)
}

func TestParseErrors(t *testing.T) {
	good := hash(t, "pw", "$2y$")
	tests := []struct {
		name, file, want string
	}{
		{"no colon", "alice\n", "users:1: want user:hash"},
		{"empty user", ":" + good + "\n", "users:1: empty user name"},
		{"md5", "# c\nalice:$apr1$MkRrVlzU$lhrBqbBQ58YMUtC8xBMTs.\n", `users:2: user "alice": not a bcrypt hash (make one with htpasswd -B)`},
		{"sha1", "alice:{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=\n", `users:1: user "alice": not a bcrypt hash`},
		{"crypt", "alice:rl0u8ZqUDw1Fk\n", `users:1: user "alice": not a bcrypt hash`},
		{"plain text", "alice:secret\n", `users:1: user "alice": not a bcrypt hash`},
		{"empty hash", "alice:\n", `users:1: user "alice": not a bcrypt hash`},
		{"truncated bcrypt", "alice:" + good[:40] + "\n", `users:1: user "alice": malformed bcrypt hash`},
		{"bad cost", "alice:$2y$xx$" + good[7:] + "\n", `users:1: user "alice": malformed bcrypt hash`},
		{"trailing junk", "alice:" + good + "x\n", `users:1: user "alice": malformed bcrypt hash: 61 characters, want 60`},
		{"duplicate", "alice:" + good + "\n\nalice:" + good + "\n", `users:3: user "alice" appears twice`},
		{"reserved infix", "ci-session-1:" + good + "\n", `users:1: user "ci-session-1": a user name must not contain "-session-"`},
		{"reserved ending", "ci-session:" + good + "\n", `users:1: user "ci-session": a user name must not contain "-session-" nor end in "-session"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(tt.file), "users")
			require.Error(t, err)
			assert.Contains(t, err.Error(), "auth file "+tt.want)
			assert.NotContains(t, err.Error(), "\n", "one line")
			assert.NotContains(t, err.Error(), good[7:], "the hash is not repeated")
		})
	}
}

// parseFile reads an htpasswd file as egressd does: whole, then Parse with
// its path as the name.
func parseFile(t *testing.T, path string) (*Users, error) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return Parse(bytes.NewReader(data), path)
}

func TestParseFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "htpasswd")
	require.NoError(t, os.WriteFile(path, []byte("alice:$apr1$MkRrVlzU$lhrBqbBQ58YMUtC8xBMTs.\n"), 0o600))
	_, err := parseFile(t, path)
	assert.EqualError(t, err, fmt.Sprintf(`auth file %s:1: user "alice": not a bcrypt hash (make one with htpasswd -B)`, path))
}

// TestParseHtpasswd reads what Apache's htpasswd -B writes, with its default
// cost and with -C 10.
func TestParseHtpasswd(t *testing.T) {
	bin, err := exec.LookPath("htpasswd")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("htpasswd is missing: install apache2-utils")
		}
		t.Skip("skipping: htpasswd not installed (Debian: apache2-utils)")
	}
	path := filepath.Join(t.TempDir(), "htpasswd")
	for _, args := range [][]string{
		{"-B", "-b", "-c", path, "alice", "correct horse"},
		{"-B", "-C", "10", "-b", path, "bob", "p@ss:w0rd"}, // a colon in a password is fine
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	u, err := parseFile(t, path)
	require.NoError(t, err)
	assert.Equal(t, 2, u.Len())
	assert.True(t, u.Verify("alice", "correct horse"))
	assert.True(t, u.Verify("bob", "p@ss:w0rd"))
	assert.False(t, u.Verify("alice", "correct horse "))
	assert.False(t, u.Verify("bob", "p@ss"))

	// htpasswd -B's default cost is 5: cheap to guess.
	weak, cost := u.Weak()
	assert.Equal(t, []string{"alice"}, weak)
	assert.Equal(t, 5, cost)

	// Other hash types htpasswd makes are refused.
	md5 := filepath.Join(t.TempDir(), "md5")
	out, err := exec.Command(bin, "-m", "-b", "-c", md5, "carol", "pw").CombinedOutput()
	require.NoError(t, err, "%s", out)
	_, err = parseFile(t, md5)
	assert.ErrorContains(t, err, md5+`:1: user "carol": not a bcrypt hash`)
}

func TestVerifyCache(t *testing.T) {
	u, err := Parse(strings.NewReader("alice:"+hash(t, "pw", "$2y$")), "users")
	require.NoError(t, err)
	cached := func() int {
		u.mu.Lock()
		defer u.mu.Unlock()
		return len(u.ok)
	}

	assert.False(t, u.Verify("alice", "wrong"))
	assert.False(t, u.Verify("mallory", "pw"))
	assert.Zero(t, cached(), "failures are never remembered")
	assert.False(t, u.Cached("alice", "pw"))
	assert.True(t, u.Verify("alice", "pw"))
	assert.Equal(t, 1, cached())
	assert.True(t, u.Cached("alice", "pw"))
	assert.False(t, u.Cached("alice", "wrong"))
	assert.True(t, u.Verify("alice", "pw"), "from the cache")
	assert.Equal(t, 1, cached())
	assert.False(t, u.Verify("alice", "pwx"), "a cached password is not a prefix match")

	// A hit needs the exact pair: the key of ("alice", "pw") is no other's.
	assert.NotEqual(t, u.cacheKey("alice", "pw"), u.cacheKey("alicep", "w"))
	other, err := Parse(strings.NewReader(""), "users")
	require.NoError(t, err)
	assert.NotEqual(t, u.cacheKey("alice", "pw"), other.cacheKey("alice", "pw"), "salted per Users")

	// Bounded: a full cache forgets one entry per new one.
	u.mu.Lock()
	for i := range cacheSize + 10 {
		if len(u.ok) >= cacheSize {
			break
		}
		u.ok[u.cacheKey(fmt.Sprint("user", i), "x")] = struct{}{}
	}
	u.mu.Unlock()
	require.Equal(t, cacheSize, cached())
	u.mu.Lock()
	delete(u.ok, u.cacheKey("alice", "pw"))
	u.mu.Unlock()
	u.mu.Lock()
	u.ok[u.cacheKey("filler", "x")] = struct{}{} // full again, without alice
	u.mu.Unlock()
	assert.True(t, u.Verify("alice", "pw"))
	assert.Equal(t, cacheSize, cached(), "never more than cacheSize")
}

// BenchmarkVerify: a check that bcrypt must do (cost 10) against one the
// cache answers.
func BenchmarkVerify(b *testing.B) {
	h, err := bcrypt.GenerateFromPassword([]byte("pw"), 10)
	require.NoError(b, err)
	u, err := Parse(strings.NewReader("alice:"+string(h)), "users")
	require.NoError(b, err)
	b.Run("bcrypt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			u.mu.Lock()
			clear(u.ok)
			u.mu.Unlock()
			if !u.Verify("alice", "pw") {
				b.Fatal("refused")
			}
		}
	})
	b.Run("cached", func(b *testing.B) {
		b.ReportAllocs()
		u.Verify("alice", "pw")
		for b.Loop() {
			if !u.Verify("alice", "pw") {
				b.Fatal("refused")
			}
		}
	})
}
