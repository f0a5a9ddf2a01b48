package doccheck

import (
	"io/fs"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"testing/fstest"
	"unicode"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// root is the repository, relative to this package.
const root = "../.."

// TestLinks: every relative link and #anchor in the repository's Markdown
// files resolves.
func TestLinks(t *testing.T) {
	files := markdownFiles(t, root)
	for _, want := range []string{"README.md", "docs/clients.md", "bench/README.md", "deploy/nixos/README.md"} {
		require.Contains(t, files, want, "the check must cover %s", want)
	}
	for _, f := range files {
		assert.Empty(t, brokenLinks(os.DirFS(root), f), "broken links in %s", f)
	}
}

// TestBrokenLinksFound: the check reports a missing file, a missing anchor
// in another file and in the same file, and passes what resolves, so that
// TestLinks can fail.
func TestBrokenLinksFound(t *testing.T) {
	fsys := fstest.MapFS{
		"README.md": {Data: []byte("# Top\n\n## The router's table: `-new-addrs`\n\n## Top\n\n" +
			"[ok](docs/a.md) [ok](docs/a.md#a-heading) [ok](#the-routers-table--new-addrs) [ok](#top-1)\n" +
			"![ok](docs/) [web](https://example.org/x.md#nowhere) `[code](gone.md)`\n" +
			"[gone](docs/gone.md) [bad anchor](docs/a.md#nowhere) [bad here](#nowhere)\n\n" +
			"```\n[in a block](gone-too.md)\n```\n\n[ref]: docs/also-gone.md\n")},
		"docs/a.md": {Data: []byte("# A heading\n")},
	}
	got := brokenLinks(fsys, "README.md")
	assert.Equal(t, []string{
		"README.md:9: docs/gone.md: no such file",
		"README.md:9: docs/a.md#nowhere: no heading with anchor #nowhere",
		"README.md:9: #nowhere: no heading with anchor #nowhere",
		"README.md:15: docs/also-gone.md: no such file",
	}, got)
}

func TestSlug(t *testing.T) {
	for _, tt := range []struct{ heading, want string }{
		{"Run it on a server", "run-it-on-a-server"},
		{"The router's neighbour table: `-new-addrs`, `-neigh-window`", "the-routers-neighbour-table--new-addrs--neigh-window"},
		{"Serve other machines safely: `-allow`, `-auth-file`", "serve-other-machines-safely--allow--auth-file"},
		{"Limits: what one client can hold", "limits-what-one-client-can-hold"},
		{"Is it working?", "is-it-working"},
		{"Every request gets 504 (on-link)", "every-request-gets-504-on-link"},
		{"[Linked](x.md) *and* **bold** text", "linked-and-bold-text"},
		{"snake_case and ünïcode", "snake_case-and-ünïcode"},
	} {
		t.Run(tt.heading, func(t *testing.T) {
			assert.Equal(t, tt.want, slug(tt.heading))
		})
	}
}

// markdownFiles lists the .md files under dir, slash-separated and relative
// to it, leaving out .git and build output.
func markdownFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	require.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".md") {
			rel, err := filepath.Rel(dir, p)
			if err != nil {
				return err
			}
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	}))
	return files
}

var (
	fence     = regexp.MustCompile("^\\s*(```|~~~)")
	codeSpan  = regexp.MustCompile("`+[^`]*`+")
	inline    = regexp.MustCompile(`!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)`)
	reference = regexp.MustCompile(`^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+.*)?$`)
	heading   = regexp.MustCompile(`^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$`)
	scheme    = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9+.-]*:`)
)

// brokenLinks returns "FILE:LINE: TARGET: why" for each relative link of the
// Markdown file name in fsys that does not resolve: a file that does not
// exist, or an #anchor that no heading of the target Markdown file has.
// Links in code blocks and code spans, and links with a scheme (https:,
// mailto:), are not checked.
func brokenLinks(fsys fs.FS, name string) []string {
	text, err := fs.ReadFile(fsys, name)
	if err != nil {
		return []string{name + ": " + err.Error()}
	}
	var bad []string
	for _, l := range links(string(text)) {
		if why := resolve(fsys, name, l.target); why != "" {
			bad = append(bad, name+":"+strconv.Itoa(l.line)+": "+l.target+": "+why)
		}
	}
	return bad
}

type link struct {
	line   int
	target string
}

// links returns the targets of the inline links, images and reference
// definitions of a Markdown text, outside code.
func links(text string) []link {
	var out []link
	inFence := false
	for i, line := range strings.Split(text, "\n") {
		if fence.MatchString(line) {
			inFence = !inFence
			continue
		}
		if inFence {
			continue
		}
		line = codeSpan.ReplaceAllString(line, "")
		for _, m := range inline.FindAllStringSubmatch(line, -1) {
			out = append(out, link{i + 1, m[1]})
		}
		if m := reference.FindStringSubmatch(line); m != nil {
			out = append(out, link{i + 1, m[1]})
		}
	}
	return out
}

// resolve says why target, a link in the file from, does not resolve, or "".
func resolve(fsys fs.FS, from, target string) string {
	if scheme.MatchString(target) || strings.HasPrefix(target, "//") {
		return ""
	}
	file, anchor, _ := strings.Cut(target, "#")
	file, err := url.PathUnescape(file)
	if err != nil {
		return "bad escape: " + err.Error()
	}
	dest := from
	if file != "" {
		dest = path.Join(path.Dir(from), file)
		if !fs.ValidPath(dest) {
			return "outside the repository"
		}
		if _, err := fs.Stat(fsys, dest); err != nil {
			return "no such file"
		}
	}
	if anchor == "" {
		return ""
	}
	if !strings.HasSuffix(dest, ".md") {
		return "an anchor in a file that is not Markdown"
	}
	text, err := fs.ReadFile(fsys, dest)
	if err != nil {
		return err.Error()
	}
	if !anchors(string(text))[anchor] {
		return "no heading with anchor #" + anchor
	}
	return ""
}

// anchors returns the anchors GitHub gives the headings of a Markdown text:
// each heading's slug, and for the second and later headings of one slug
// the slug with -1, -2, … appended.
func anchors(text string) map[string]bool {
	seen := map[string]int{}
	out := map[string]bool{}
	inFence := false
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\n")
		if fence.MatchString(line) {
			inFence = !inFence
			continue
		}
		m := heading.FindStringSubmatch(line)
		if inFence || m == nil {
			continue
		}
		s := slug(m[1])
		if n := seen[s]; n > 0 {
			out[s+"-"+strconv.Itoa(n)] = true
		} else {
			out[s] = true
		}
		seen[s]++
	}
	return out
}

var mdLink = regexp.MustCompile(`!?\[([^\]]*)\]\([^)]*\)`)

// slug is GitHub's anchor for a heading: the heading's text as rendered
// (links become their text; code and emphasis marks go), lower case, with
// every character but letters, digits, '_', '-' and spaces dropped and each
// space made a '-'.
func slug(h string) string {
	h = mdLink.ReplaceAllString(h, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(h) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}
