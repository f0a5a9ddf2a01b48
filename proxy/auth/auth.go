// Package auth holds the proxy's users: it reads an htpasswd file of bcrypt
// hashes, as `htpasswd -B` writes it, and checks a user name and password
// against it.
//
// bcrypt is slow on purpose (about 50-100 ms at cost 10), and a proxy client
// sends its credentials with every request and every tunnel, so successful
// checks are remembered: by a SHA-256 of the user name and password, in a
// cache of bounded size that belongs to one Users value. Reading the file
// again makes a new Users, with an empty cache. Failed checks are never
// remembered, so guessing stays as slow as bcrypt makes it.
package auth

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"golang.org/x/crypto/bcrypt"
)

// ReservedInfix may not appear in a user name: with authentication on, a
// proxy user name USER-session-KEY carries a session key after it.
const ReservedInfix = "-session-"

// reservedEnd may not end a user name: USER-session-KEY would hold
// ReservedInfix before the one that starts the key.
const reservedEnd = "-session"

// cacheSize bounds the remembered successful checks: far more than the
// distinct user and password pairs a proxy's clients use, and about 64 KiB.
const cacheSize = 1024

// Users are the users of an auth file. The zero value has no users. A Users
// is safe for concurrent use.
type Users struct {
	hashes map[string][]byte // user name -> bcrypt hash
	decoy  []byte            // a hash of the file, checked for unknown users
	salt   [16]byte          // of cacheKey

	mu sync.Mutex
	ok map[[sha256.Size]byte]struct{} // successful checks, by cacheKey
}

// Parse reads htpasswd lines "user:hash" from r, where hash is a bcrypt hash
// ($2y$, $2a$ or $2b$), as `htpasswd -B` writes it. Blank lines and lines
// starting with # are skipped. Any other hash type, a malformed line, a user
// named twice or a user name containing ReservedInfix or ending in
// "-session" is an error that names name:line.
func Parse(r io.Reader, name string) (*Users, error) {
	u := &Users{hashes: make(map[string][]byte)}
	_, _ = rand.Read(u.salt[:]) // never fails (crypto/rand)
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, err := parseLine(line)
		if err != nil {
			return nil, fmt.Errorf("auth file %s:%d: %w", name, n, err)
		}
		if _, dup := u.hashes[user]; dup {
			return nil, fmt.Errorf("auth file %s:%d: user %q appears twice", name, n, user)
		}
		u.hashes[user] = hash
		if u.decoy == nil {
			u.decoy = hash
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("auth file %s: %w", name, err)
	}
	return u, nil
}

func parseLine(line string) (user string, hash []byte, err error) {
	user, h, ok := strings.Cut(line, ":")
	switch {
	case !ok:
		return "", nil, errors.New("want user:hash")
	case user == "":
		return "", nil, errors.New("empty user name")
	case strings.Contains(user, ReservedInfix), strings.HasSuffix(user, reservedEnd):
		// a-session-session-KEY would be user "a" with key "session-KEY".
		return "", nil, fmt.Errorf("user %q: a user name must not contain %q nor end in %q (it starts a session key)",
			user, ReservedInfix, reservedEnd)
	}
	if !strings.HasPrefix(h, "$2y$") && !strings.HasPrefix(h, "$2a$") && !strings.HasPrefix(h, "$2b$") {
		return "", nil, fmt.Errorf("user %q: not a bcrypt hash (make one with htpasswd -B)", user)
	}
	if _, err := bcrypt.Cost([]byte(h)); err != nil {
		return "", nil, fmt.Errorf("user %q: malformed bcrypt hash: %v", user, err)
	}
	if len(h) != 60 {
		return "", nil, fmt.Errorf("user %q: malformed bcrypt hash: %d characters, want 60", user, len(h))
	}
	return user, []byte(h), nil
}

// MinCost is the bcrypt cost below which a hash is cheap to guess: at cost
// 10 a check takes about 71 ms of CPU, at cost 5 (htpasswd -B's default)
// about 2 ms, some 1,000 guesses a second from one client.
const MinCost = 10

// Weak returns, sorted, the users whose hashes have a bcrypt cost below
// MinCost, and the lowest cost among them.
func (u *Users) Weak() (users []string, cost int) {
	for name, h := range u.hashes {
		c, err := bcrypt.Cost(h)
		if err != nil || c >= MinCost {
			continue
		}
		users = append(users, name)
		if cost == 0 || c < cost {
			cost = c
		}
	}
	slices.Sort(users)
	return users, cost
}

// Len returns the number of users.
func (u *Users) Len() int { return len(u.hashes) }

// Cached reports whether user and pass passed Verify before and are still
// remembered: a check that costs no bcrypt.
func (u *Users) Cached(user, pass string) bool {
	key := u.cacheKey(user, pass)
	u.mu.Lock()
	_, hit := u.ok[key]
	u.mu.Unlock()
	return hit
}

// Verify reports whether pass is user's password.
func (u *Users) Verify(user, pass string) bool {
	if u.Cached(user, pass) {
		return true
	}
	key := u.cacheKey(user, pass)
	hash, known := u.hashes[user]
	if !known {
		// As slow as a known user's wrong password, so that the time taken
		// does not tell which user names exist.
		if u.decoy != nil {
			_ = bcrypt.CompareHashAndPassword(u.decoy, []byte(pass))
		}
		return false
	}
	if bcrypt.CompareHashAndPassword(hash, []byte(pass)) != nil {
		return false
	}
	u.mu.Lock()
	if u.ok == nil {
		u.ok = make(map[[sha256.Size]byte]struct{})
	}
	if len(u.ok) >= cacheSize {
		for k := range u.ok { // full: forget one, any one
			delete(u.ok, k)
			break
		}
	}
	u.ok[key] = struct{}{}
	u.mu.Unlock()
	return true
}

// cacheKey hashes a user name and password with the Users' random salt, so
// that the cache is no table of fast password hashes for whoever reads the
// process's memory; the length prefix keeps ("a", "bc") and ("ab", "c")
// apart.
func (u *Users) cacheKey(user, pass string) [sha256.Size]byte {
	b := make([]byte, 0, len(u.salt)+binary.MaxVarintLen64+len(user)+len(pass))
	b = append(b, u.salt[:]...)
	b = binary.AppendUvarint(b, uint64(len(user)))
	b = append(append(b, user...), pass...)
	k := sha256.Sum256(b)
	clear(b)
	return k
}
