#!/bin/sh
# Installs what the comparison harness (bench/compare) measures egressd
# against, Squid and tinyproxy from Debian's packages, when they are missing.
# Debian's maintainer scripts would start both as services on the host: a
# policy-rc.d that refuses every start (exit 101) keeps them stopped while
# the packages install; it is removed afterwards, also on failure. Needs
# root and apt-get.
set -eu

missing=""
command -v squid >/dev/null 2>&1 || missing="$missing squid"
command -v tinyproxy >/dev/null 2>&1 || missing="$missing tinyproxy"
if [ -z "$missing" ]; then
	exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps.sh: installing$missing needs root" >&2
	exit 1
fi
policy=/usr/sbin/policy-rc.d
if [ -e "$policy" ]; then
	echo "install-deps.sh: $policy exists already; not replacing it" >&2
	exit 1
fi
trap 'rm -f "$policy"' EXIT INT TERM
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"
echo "installing$missing (services kept stopped)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
