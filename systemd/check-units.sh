#!/usr/bin/env bash
# Static checks of the systemd units: `systemd-analyze verify` against a
# scratch root holding the installed binary and /bin/sh (it checks that
# ExecStart's and ExecReload's programs exist), and `systemd-analyze
# security`, failing above an exposure of 1.2.
# Usage: systemd/check-units.sh [path/to/release/gateway]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$repo/target/release/gateway}
max_exposure=1.2

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# verify resolves the units' dependencies (sysinit.target, ...) in the
# root: the host's units first, then ours over them, where the package
# puts them (README, "Install").
mkdir -p "$root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
install -D -m 0755 "$binary" "$root/usr/bin/gateway"
# ExecReload runs /bin/sh (its built-in kill): verify checks that it exists.
install -D -m 0755 "$(readlink -f /bin/sh)" "$root/bin/sh"
install -D -m 0644 "$repo/config.toml" "$root/etc/gateway/config.toml"
install -D -m 0644 "$repo/systemd/gateway.service" "$root/usr/lib/systemd/system/gateway.service"
install -D -m 0644 "$repo/systemd/gateway.socket" "$root/usr/lib/systemd/system/gateway.socket"
echo "== systemd-analyze verify"
systemd-analyze verify --root="$root" /usr/lib/systemd/system/gateway.socket /usr/lib/systemd/system/gateway.service
echo "units verify clean"

echo "== systemd-analyze security"
report=$(systemd-analyze security --offline=yes "$repo/systemd/gateway.service")
echo "$report" | grep -v '✓' | tail -n 12
exposure=$(echo "$report" | sed -nE 's/.*Overall exposure level for gateway.service: ([0-9.]+).*/\1/p')
[ -n "$exposure" ] || { echo "no exposure score in the report"; exit 1; }
awk -v e="$exposure" -v m="$max_exposure" 'BEGIN { exit !(e <= m) }' \
  || { echo "exposure $exposure is above $max_exposure"; exit 1; }
echo "exposure $exposure (at most $max_exposure): ok"
