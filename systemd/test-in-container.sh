#!/usr/bin/env bash
# Runs the gateway under a real systemd (Debian 12 in systemd-nspawn) and
# checks what the README ("Deploy with systemd") promises operators:
#   - gateway.socket + gateway.service start; GET / answers the welcome;
#   - `systemctl status gateway` shows the daemon's STATUS= line;
#   - switching runtime.backend and `systemctl restart gateway` under load
#     fails no request (twice: tokio → smol → tokio), and the built-in
#     counter's count (a file in StateDirectory) comes through both restarts
#     exact;
#   - journalctl shows the startup line of each backend;
#   - a bad config exits 78 and is not restarted (NRestarts stays 0).
# Needs root, debootstrap and systemd-container. The Debian root is cached
# in $GATEWAY_NSPAWN_CACHE (default /var/cache/gateway-ci), outside the repo.
# Usage: systemd/test-in-container.sh [path/to/release/gateway]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$repo/target/release/gateway}
cache=${GATEWAY_NSPAWN_CACHE:-/var/cache/gateway-ci}
base=$cache/bookworm
[ -x "$binary" ] || { echo "no gateway binary at $binary (cargo build --release -p gateway)"; exit 1; }

if [ ! -x "$base/usr/bin/systemctl" ]; then
  echo "== debootstrap (first run only; cached in $base)"
  mkdir -p "$cache"
  rm -rf "$base.tmp"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl \
    bookworm "$base.tmp" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log"; exit 1; }
  mv "$base.tmp" "$base"
fi

# A fresh copy of the cached root for this run.
root=$(mktemp -d /var/tmp/gateway-nspawn.XXXXXX)
nspawn_pid=
cleanup() {
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
  fi
  rm -rf "$root" "$root.console.log"
}
trap cleanup EXIT
cp -a "$base/." "$root/"

install -D -m 0755 "$binary" "$root/usr/local/bin/gateway"
install -D -m 0644 "$repo/config.toml" "$root/etc/gateway/config.toml"
install -D -m 0644 "$repo/systemd/gateway.service" "$root/etc/systemd/system/gateway.service"
install -D -m 0644 "$repo/systemd/gateway.socket" "$root/etc/systemd/system/gateway.socket"
install -D -m 0644 "$repo/README.md" "$root/usr/local/share/doc/gateway/README.md"
install -D -m 0644 -t "$root/usr/local/share/doc/gateway/docs" "$repo"/docs/*.md
echo gateway-ci > "$root/etc/hostname"

echo "== boot"
systemd-nspawn -D "$root" --register=no --keep-unit --private-network \
  --console=pipe -b </dev/null >"$root.console.log" 2>&1 &
nspawn_pid=$!
# The container's init is the child of systemd-nspawn that has exec'ed
# systemd. Not just any child: nspawn first forks an "outer child" that sets
# up the namespaces and exits, and picking it up leaves a PID that is gone a
# moment later.
leader=
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn_pid" -x systemd | head -n1 || true)
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "container did not start"; cat "$root.console.log"; exit 1; }
in_container() { nsenter -t "$leader" -a "$@"; }
for _ in $(seq 100); do
  state=$(in_container systemctl is-system-running 2>/dev/null || true)
  case "$state" in running|degraded) break ;; esac
  sleep 0.2
done
echo "system state: $state"
case "$state" in
  running|degraded) ;;
  *) echo "the container's systemd did not come up"; tail -n 40 "$root.console.log"; exit 1 ;;
esac

fail() { echo "FAIL: $*"; in_container journalctl -u gateway --no-pager | tail -30; exit 1; }

echo "== systemctl enable --now gateway.socket gateway.service"
in_container systemctl enable --now gateway.socket gateway.service
answer=$(in_container curl -sS --max-time 5 http://127.0.0.1:3000/)
echo "GET / -> $answer"
[ "$answer" = "Welcome to my site!" ] || fail "unexpected answer"

echo "== systemctl status gateway"
sleep 6   # the STATUS= line is refreshed every 5 s
# Captured first: `grep -q` exits at the first match, and under pipefail
# the writer's SIGPIPE would fail the pipeline.
status_text=$(in_container systemctl status gateway --no-pager || true)
echo "$status_text" | head -n 12
grep -q 'Status: "tokio with' <<<"$status_text" || fail "no STATUS line"

echo "== switch backend under load"
count_before=$(in_container curl -sS --max-time 5 http://127.0.0.1:3001/counter)
in_container rm -f /root/load.stop /root/load.result
in_container sh -c '
  ok=0; failed=0
  while [ ! -e /root/load.stop ]; do
    if [ "$(curl -sS --max-time 10 http://127.0.0.1:3000/ 2>/dev/null)" = "Welcome to my site!" ]; then
      ok=$((ok + 1)); else failed=$((failed + 1)); fi
  done
  echo "$ok $failed" > /root/load.result' &
load_pid=$!
sleep 1
for backend in smol tokio; do
  in_container sed -i "s/^backend = .*/backend = \"$backend\"/" /etc/gateway/config.toml
  in_container systemctl restart gateway
  echo "restarted on $backend: $(in_container systemctl show gateway -p StatusText --value)"
  sleep 1
done
in_container touch /root/load.stop
wait "$load_pid" || true
read -r ok failed < "$root/root/load.result"
echo "requests during the restarts: $ok ok, $failed failed"
[ "$failed" = 0 ] && [ "$ok" -gt 0 ] || fail "requests failed across restarts"
count_after=$(in_container curl -sS --max-time 5 http://127.0.0.1:3001/counter)
echo "count: $count_before before, $count_after after (+$ok expected)"
[ "$count_after" = $((count_before + ok)) ] || fail "the count did not come through the restarts exact"
in_container test -s /var/lib/gateway/counter.state || fail "no state file in /var/lib/gateway"

echo "== journalctl -u gateway"
journal=$(in_container journalctl -u gateway --no-pager)
grep -E 'starting|listening on|passed by systemd' <<<"$journal" | tail -n 12
grep -q 'starting backend="smol"' <<<"$journal" || fail "no smol startup line"
grep -q 'starting backend="tokio"' <<<"$journal" || fail "no tokio startup line"

echo "== bad config"
in_container sh -c 'printf "[runtime]\nbackend = \"glommio\"\n" > /etc/gateway/config.toml'
in_container systemctl restart gateway && fail "a bad config started"
sleep 1
status=$(in_container systemctl show gateway -p ExecMainStatus --value)
restarts=$(in_container systemctl show gateway -p NRestarts --value)
echo "exit status $status, NRestarts $restarts"
journal=$(in_container journalctl -u gateway --no-pager)
grep 'configuration error' <<<"$journal" | tail -n 1
[ "$status" = 78 ] || fail "exit status $status, not 78"
[ "$restarts" = 0 ] || fail "restarted $restarts times"

echo "== poweroff"
in_container systemctl poweroff || true
for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$nspawn_pid" 2>/dev/null && fail "container did not power off"
nspawn_pid=
echo "systemd container test: ok"
