// Package doccheck keeps egressd's Markdown documentation honest: its test
// fails when a relative link in any .md file of the repository names a file
// that does not exist, or an #anchor that no heading of the target has
// (GitHub's rule for heading anchors). It needs no root and no network.
package doccheck
