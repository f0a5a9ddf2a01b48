package auth

import (
	"bytes"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// FuzzParse feeds auth files through Parse (the seeds, in testdata/fuzz, are
// htpasswd lines of each bcrypt prefix and of the hashes htpasswd makes
// besides). An error is one line naming the file and a line of it; the
// users of a file it accepts are one per line that is neither blank nor a
// comment, with a name a proxy user name USER-session-KEY gives back whole
// and a 60-character bcrypt hash, and written out again they read back the
// same.
func FuzzParse(f *testing.F) {
	errLine := regexp.MustCompile(`^auth file fuzz\.htpasswd:(\d+): `)
	f.Fuzz(func(t *testing.T, file string) {
		u, err := Parse(strings.NewReader(file), "fuzz.htpasswd")
		lines := strings.Split(file, "\n")
		if err != nil {
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Fatalf("error of more than one line: %q", msg)
			}
			if strings.HasSuffix(msg, "token too long") { // a line of 64 KiB or more
				return
			}
			m := errLine.FindStringSubmatch(msg)
			if m == nil {
				t.Fatalf("error %q names no line", msg)
			}
			if n, _ := strconv.Atoi(m[1]); n < 1 || n > len(lines) {
				t.Fatalf("error %q names line %d of %d", msg, n, len(lines))
			}
			return
		}

		users := 0
		for _, l := range lines {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
				users++
			}
		}
		if u.Len() != users {
			t.Fatalf("%d users from %d lines", u.Len(), users)
		}
		var out bytes.Buffer
		for _, user := range slices.Sorted(maps.Keys(u.hashes)) {
			h := u.hashes[user]
			switch {
			case user == "" || strings.ContainsAny(user, ":\n"):
				t.Fatalf("user %q", user)
			case strings.Index(user+ReservedInfix, ReservedInfix) != len(user):
				// "a-session": a-session-session-KEY splits as "a" and "session-KEY"
				t.Fatalf("user %q: %q splits before the key", user, user+ReservedInfix+"KEY")
			case len(h) != 60 || !slices.Contains([]string{"$2y$", "$2a$", "$2b$"}, string(h[:4])):
				t.Fatalf("user %q: hash %q", user, h)
			}
			fmt.Fprintf(&out, "%s:%s\n", user, h)
		}
		again, err := Parse(&out, "again")
		if err != nil || !maps.EqualFunc(again.hashes, u.hashes, bytes.Equal) {
			t.Fatalf("%q reads back as %v, %v", out.String(), again, err)
		}
	})
}
