#!/usr/bin/env bash
# demo.sh: watch egressd send every request from a fresh IPv6 address.
#
#   sudo test/demo.sh [path/to/egressd [path/to/echo-upstream]]
#
# make demo runs it with bin/egressd and bin/echo-upstream; without arguments
# it uses ./bin/egressd and builds the echo upstream (test/upstream) itself.
#
# It builds a throw-away network of two namespaces, the same as the
# integration tests (test/nstest):
#
#   H (the host, runs egressd)                   R (the "Internet")
#   veth 2001:db8:1:2::2/64  <---------------->  veth 2001:db8:1:2::1/64
#   default via 2001:db8:1:2::1                   lo 2001:db8:ffff::1 = upstream.test
#
# and an echo upstream in R that answers every request with the address it
# came from. It shows the host's default source address before egressd
# starts, while it runs and after it stopped (the same each time: egress
# addresses are deprecated, so the kernel never picks one for the host's own
# connections), and lists paced requests in the order the upstream got them.
# Colour only on a terminal. Everything it makes (namespaces, processes, /etc/netns/NAME) is
# removed on exit, also on failure or Ctrl-C. It never touches the machine's
# own interfaces, addresses or routes.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
	echo "demo.sh: needs root to make network namespaces (try: sudo $0 $*)" >&2
	exit 1
fi

egressd=${1:-./bin/egressd}
if [[ ! -x $egressd ]]; then
	echo "demo.sh: no egressd binary at $egressd (make build, or give its path)" >&2
	exit 1
fi
egressd=$(realpath "$egressd")
# The echo upstream: $2 (make demo passes bin/echo-upstream), else built below.
upstream_bin=${2:-}
[[ -n $upstream_bin ]] && upstream_bin=$(realpath "$upstream_bin")
# egressctl: $3 (make demo passes bin/egressctl); the stats step is skipped without it.
egressctl=${3:-}
[[ -n $egressctl ]] && egressctl=$(realpath "$egressctl")
cd "$(dirname "$0")/.."

# Short unique names: interface names must stay within 15 bytes.
H="egdemo$$h"
R="egdemo$$r"
prefix=2001:db8:1:2::/64
host_addr=2001:db8:1:2::2
upstream=2001:db8:ffff::1
tmp=$(mktemp -d)
made_etc_netns=
upstream_pid=
egressd_pid=

cleanup() {
	set +e
	# Our own background processes first, by pid: a polite SIGTERM (egressd
	# then removes its addresses), SIGKILL after 5 s.
	for pid in $egressd_pid $upstream_pid; do
		kill -TERM "$pid" 2>/dev/null
	done
	for pid in $egressd_pid $upstream_pid; do
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	# Then anything else still running in the namespaces.
	for ns in "$H" "$R"; do
		if [[ -e /run/netns/$ns ]]; then
			for pid in $(ip netns pids "$ns"); do
				kill -KILL "$pid" 2>/dev/null
			done
			ip netns del "$ns"
		fi
		rm -rf "/etc/netns/$ns"
	done
	[[ -n $made_etc_netns ]] && rmdir /etc/netns 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

# Bold step titles on a terminal; plain text when piped or logged.
if [[ -t 1 ]]; then
	step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	step() { printf '\n== %s\n' "$*"; }
fi

# wait_for SECONDS COMMAND...: run COMMAND every 0.1 s until it succeeds.
wait_for() {
	local tries=$(($1 * 10))
	shift
	until "$@"; do
		tries=$((tries - 1))
		if ((tries <= 0)); then
			return 1
		fi
		sleep 0.1
	done
}

step "building the network: namespaces $H (host) and $R (router)"
ip netns add "$H"
ip netns add "$R"
ip netns exec "$R" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
ip -n "$H" link add "$H" type veth peer name "$R" netns "$R"
ip -n "$H" link set lo up
ip -n "$R" link set lo up
ip -n "$H" link set "$H" up
ip -n "$R" link set "$R" up
ip -n "$H" addr add "$host_addr/64" dev "$H" nodad
ip -n "$R" addr add 2001:db8:1:2::1/64 dev "$R" nodad
ip -n "$R" addr add "$upstream/128" dev lo
ip -n "$H" -6 route add default via 2001:db8:1:2::1 dev "$H"
[[ -d /etc/netns ]] || made_etc_netns=1
mkdir -p "/etc/netns/$H"
printf '127.0.0.1 localhost\n::1 localhost\n%s upstream.test\n' "$upstream" >"/etc/netns/$H/hosts"
printf 'nameserver ::1\noptions timeout:1 attempts:1\n' >"/etc/netns/$H/resolv.conf"
no_tentative() { [[ -z $(ip -n "$H" -6 addr show tentative) ]]; }
wait_for 10 no_tentative
ip -n "$H" -6 addr show dev "$H"

# default_source prints the source address the kernel picks in H for an
# ordinary connection to the upstream: what every program on the host that
# does not go through egressd sends from.
default_source() {
	ip -n "$H" -6 route get "$upstream" | sed -n 's/.* src \([^ ]*\).*/\1/p'
}
step "the host's default source address, before egressd starts (ip -6 route get $upstream)"
ip -n "$H" -6 route get "$upstream"
source_before=$(default_source)
echo "default source: $source_before"

step "starting the echo upstream in $R on [$upstream]:80 and :443"
if [[ -z $upstream_bin || ! -x $upstream_bin ]]; then
	upstream_bin=$tmp/echo-upstream
	go build -o "$upstream_bin" ./test/upstream
fi
# `ip netns exec` execs in place, so $! is the upstream's own pid.
# -v: it logs every request it gets, with its own time of arrival.
ip netns exec "$R" "$upstream_bin" -v -listen "[$upstream]:80" -tls-listen "[$upstream]:443" \
	-cert-out "$tmp/ca.pem" 2>"$tmp/upstream.log" &
upstream_pid=$!
upstream_up() { [[ $(grep -c 'msg=listening' "$tmp/upstream.log" 2>/dev/null) -ge 2 ]]; }
wait_for 10 upstream_up || {
	cat "$tmp/upstream.log" >&2
	exit 1
}
echo "without a proxy, upstream.test sees the host's own address:"
echo "  $(ip netns exec "$H" curl -s --max-time 10 http://upstream.test/)"

limit="upstream.test=5r/s,burst=2"
step "starting egressd in $H: $egressd -interface $H -prefix $prefix -limit $limit -admin $tmp/admin.sock"
# Its instance lock goes to the demo's own runtime directory, not the machine's /run/egressd.
RUNTIME_DIRECTORY="$tmp" ip netns exec "$H" "$egressd" -interface "$H" -prefix "$prefix" -limit "$limit" -admin "$tmp/admin.sock" 2>"$tmp/egressd.log" &
egressd_pid=$!
egressd_up() { grep -q 'msg=listening' "$tmp/egressd.log" 2>/dev/null; }
if ! wait_for 10 egressd_up; then
	echo "egressd did not start:" >&2
	cat "$tmp/egressd.log" >&2
	exit 1
fi
grep 'msg=listening' "$tmp/egressd.log"

step "10 requests through egressd at once (curl -x http://127.0.0.1:3128 http://upstream.test/request-N), paced to 5 a second"
curls=()
for i in $(seq 1 10); do
	ip netns exec "$H" curl -s --max-time 10 -x http://127.0.0.1:3128 -o "$tmp/req$i" \
		http://upstream.test/request-"$i" &
	curls+=($!)
done
wait "${curls[@]}"
# The upstream's log lines, in the order the requests reached it:
#   time=2026-01-02T03:04:05.678Z level=INFO msg=request peer=ADDR method=GET host=upstream.test path=/request-3
echo "in the order they reached the upstream (its own clock; -limit lets 2 through at once, then one every 0.2 s):"
grep 'msg=request' "$tmp/upstream.log" | grep 'path=/request-' | awk '
	{
		for (i = 1; i <= NF; i++) {
			split($i, kv, "=")
			f[kv[1]] = substr($i, length(kv[1]) + 2)
		}
		split(substr(f["time"], 12), hms, ":")   # HH:MM:SS.mmmZ
		t = hms[1] * 3600 + hms[2] * 60 + hms[3]
		if (NR == 1) first = t
		sub("/request-", "", f["path"])
		printf "  +%.3fs  request %2d  from %s\n", t - first, f["path"], f["peer"]
	}'
distinct=$(cat "$tmp"/req* | sort -u | wc -l)
echo "distinct source addresses: $distinct of 10"
step "one HTTPS request through a CONNECT tunnel (HTTPS_PROXY=http://127.0.0.1:3128)"
printf '  https request left from %s\n' \
	"$(ip netns exec "$H" env HTTPS_PROXY=http://127.0.0.1:3128 \
		curl -s --max-time 10 --cacert "$tmp/ca.pem" https://upstream.test/)"

step "egressd's access log (last 3 lines)"
grep "msg=request" "$tmp/egressd.log" | tail -n 3

if [[ -n $egressctl ]]; then
	step "egressctl -admin $tmp/admin.sock stats"
	"$egressctl" -admin "$tmp/admin.sock" stats
fi

step "while egressd runs: the host's default source address, and what upstream.test sees without the proxy"
ip -n "$H" -6 route get "$upstream"
echo "  direct request left from $(ip netns exec "$H" curl -s --max-time 10 http://upstream.test/)"

step "addresses on $H while egressd runs (egress addresses: /128, deprecated, finite valid_lft)"
ip -n "$H" -6 addr show dev "$H" | sed -n 1,13p

step "stopping egressd with SIGTERM"
kill -TERM "$egressd_pid"
status=0
wait "$egressd_pid" || status=$?
egressd_pid=
echo "egressd exited with status $status"
ip -n "$H" -6 addr show dev "$H"
left=$(ip -n "$H" -6 addr show dev "$H" | grep -c 'inet6 2001:db8:1:2:' || true)
# One of them is the host's own address.
echo "egress addresses left on $H: $((left - 1))"

step "the host's default source address, after egressd stopped"
ip -n "$H" -6 route get "$upstream"
source_after=$(default_source)
if [[ $source_after != "$source_before" ]]; then
	echo "default source changed: $source_before before, $source_after after" >&2
	exit 1
fi
echo "default source: $source_after (unchanged)"

step "done; removing the namespaces"
