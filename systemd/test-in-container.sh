#!/usr/bin/env bash
# Installs the Debian package into a fresh Debian 12 root under a real
# systemd (systemd-nspawn) and checks what the README ("Install", "Deploy
# with systemd") promises operators:
#   - `apt-get install ./gateway_*.deb` alone starts it: GET / answers the
#     welcome; the units it installed pass `systemd-analyze verify`, the
#     service's exposure (`systemd-analyze security`) is at most 1.2;
#   - `systemctl status gateway` shows the daemon's STATUS= line;
#   - switching runtime.backend in /etc/gateway/config.toml and
#     `systemctl restart gateway` under load fails no request (twice: tokio
#     → smol → tokio), and the built-in counter's count (a file in
#     StateDirectory) comes through both restarts exact;
#   - journalctl shows the startup line of each backend;
#   - a bad config exits 78 and is not restarted (NRestarts stays 0);
#   - `gateway-bench` measures the installed gateway (a one-second run);
#   - an upgrade to a higher version under load fails no request, keeps an
#     edited config and the count, and restarts the service;
#   - `apt-get remove gateway` stops it and keeps its config and count; a
#     reinstall runs again on them; `apt-get purge gateway` of the running
#     package stops it and leaves no config, no state, no unit links.
# Needs root, debootstrap and systemd-container. The Debian root is cached
# in $GATEWAY_NSPAWN_CACHE (default /var/cache/gateway-ci), outside the repo.
# Usage: systemd/test-in-container.sh PACKAGE.deb UPGRADE.deb
#   (UPGRADE.deb: the same package with a higher version, e.g. from
#   `cargo deb -p gateway --no-build --deb-revision 2`)
set -euo pipefail
package=${1:?usage: $0 PACKAGE.deb UPGRADE.deb}
upgrade=${2:?usage: $0 PACKAGE.deb UPGRADE.deb}
cache=${GATEWAY_NSPAWN_CACHE:-/var/cache/gateway-ci}
base=$cache/bookworm
for deb in "$package" "$upgrade"; do
  [ -f "$deb" ] || { echo "no package at $deb (cargo deb -p gateway)"; exit 1; }
done

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
  rm -rf "$root" "$root.console.log" "$root.apt.log" "$root.bench.log"
}
trap cleanup EXIT
cp -a "$base/." "$root/"
cp "$package" "$root/root/gateway.deb"
cp "$upgrade" "$root/root/gateway-upgrade.deb"
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

visit() { in_container curl -sS --max-time 5 http://127.0.0.1:3000/ 2>/dev/null || true; }
count() { in_container curl -sS --max-time 5 http://127.0.0.1:3001/counter; }
# apt-get in the container; its log is shown only in part, or whole on failure.
apt() {
  in_container env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" >"$root.apt.log" 2>&1 \
    || { cat "$root.apt.log"; fail "apt-get $*"; }
  grep -E 'Setting up|Created symlink|Removing|Purging|Removed' "$root.apt.log" || true
}

echo "== apt-get install ./gateway.deb (nothing else: the package starts it)"
apt install /root/gateway.deb
answer=$(visit)
for _ in $(seq 50); do [ "$answer" = "Welcome to my site!" ] && break; sleep 0.1; answer=$(visit); done
echo "GET / -> $answer"
[ "$answer" = "Welcome to my site!" ] || fail "unexpected answer"
for unit in gateway.socket gateway.service; do
  [ "$(in_container systemctl is-enabled $unit)" = enabled ] || fail "$unit not enabled"
done
in_container dpkg -L gateway | grep -E 'bin/|systemd/system/|/etc/|doc/gateway/README' | sort
in_container systemd-analyze verify /lib/systemd/system/gateway.socket /lib/systemd/system/gateway.service \
  || fail "systemd-analyze verify on the installed units"
echo "installed units verify clean"
in_container systemd-analyze security --threshold=12 gateway.service | tail -n 1 \
  || fail "the installed unit's exposure is above 1.2"
echo "== gateway-bench measures the installed gateway"
in_container gateway-bench --backends tokio --connections 8 --duration 1s --warmup 200ms \
  --out /root/bench >"$root.bench.log" 2>&1 || { cat "$root.bench.log"; fail "gateway-bench"; }
grep -E '^tokio ' "$root.bench.log"
grep -qE '^tokio +[0-9]+ +8 .* yes( |$)' "$root.bench.log" || fail "gateway-bench: no counted row"

echo "== systemctl status gateway"
sleep 6   # the STATUS= line is refreshed every 5 s
# Captured first: `grep -q` exits at the first match, and under pipefail
# the writer's SIGPIPE would fail the pipeline.
status_text=$(in_container systemctl status gateway --no-pager || true)
echo "$status_text" | head -n 12
grep -q 'Status: "tokio with' <<<"$status_text" || fail "no STATUS line"

# Visits in a loop until stopped, expecting `$1` as the answer; then
# `ok` and `failed` hold what they got.
start_load() {
  in_container rm -f /root/load.stop /root/load.result
  in_container sh -c '
    ok=0; failed=0
    while [ ! -e /root/load.stop ]; do
      if [ "$(curl -sS --max-time 10 http://127.0.0.1:3000/ 2>/dev/null)" = "$1" ]; then
        ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
    echo "$ok $failed" > /root/load.result' sh "$1" &
  load_pid=$!
  sleep 1
}
stop_load() {
  sleep 1
  in_container touch /root/load.stop
  wait "$load_pid" || true
  read -r ok failed < "$root/root/load.result"
}

echo "== switch backend under load"
count_before=$(count)
start_load "Welcome to my site!"
for backend in smol tokio; do
  in_container sed -i "s/^backend = .*/backend = \"$backend\"/" /etc/gateway/config.toml
  in_container systemctl restart gateway
  echo "restarted on $backend: $(in_container systemctl show gateway -p StatusText --value)"
  sleep 1
done
stop_load
echo "requests during the restarts: $ok ok, $failed failed"
[ "$failed" = 0 ] && [ "$ok" -gt 0 ] || fail "requests failed across restarts"
count_after=$(count)
echo "count: $count_before before, $count_after after (+$ok expected)"
[ "$count_after" = $((count_before + ok)) ] || fail "the count did not come through the restarts exact"
in_container test -s /var/lib/gateway/counter.state || fail "no state file in /var/lib/gateway"
in_container test -s /var/lib/private/gateway/counter.state || fail "the state is not the dynamic user's (/var/lib/private/gateway)"

echo "== journalctl -u gateway"
journal=$(in_container journalctl -u gateway --no-pager)
grep -E 'starting|listening on|passed by systemd' <<<"$journal" | tail -n 12
grep -q 'starting backend="smol"' <<<"$journal" || fail "no smol startup line"
grep -q 'starting backend="tokio"' <<<"$journal" || fail "no tokio startup line"

echo "== bad config"
in_container cp /etc/gateway/config.toml /root/config.good
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

echo "== upgrade: an edited config and the count are kept"
in_container cp /root/config.good /etc/gateway/config.toml
in_container sed -i 's/^welcome = .*/welcome = "Welcome, upgraded!"/' /etc/gateway/config.toml
in_container systemctl reset-failed gateway
in_container systemctl restart gateway
[ "$(visit)" = "Welcome, upgraded!" ] || fail "the edited config did not take"
count_before=$(count)
pid_before=$(in_container systemctl show gateway -p MainPID --value)
start_load "Welcome, upgraded!"
apt install /root/gateway-upgrade.deb
stop_load
echo "version now $(in_container dpkg-query -W -f '${Version}' gateway)"
echo "requests during the upgrade: $ok ok, $failed failed"
[ "$failed" = 0 ] && [ "$ok" -gt 0 ] || fail "requests failed across the upgrade (the edited config lost, or a connection refused)"
pid_after=$(in_container systemctl show gateway -p MainPID --value)
echo "main pid $pid_before before, $pid_after after"
[ "$pid_after" != "$pid_before" ] || fail "the upgrade did not restart the service"
[ "$(in_container systemctl is-active gateway.socket)" = active ] || fail "the socket is not active after the upgrade"
count_after=$(count)
echo "count: $count_before before the upgrade, $count_after after (+$ok expected)"
[ "$count_after" = $((count_before + ok)) ] || fail "the upgrade lost the count"

echo "== apt-get remove gateway: stopped, config and count kept"
count_kept=$(count)
apt remove gateway
in_container systemctl is-active gateway.service gateway.socket && fail "still running after remove"
in_container test -f /etc/gateway/config.toml || fail "remove took the config"
in_container test -s /var/lib/private/gateway/counter.state || fail "remove took the count"

echo "== reinstall after remove: running again, with the config and count kept"
apt install /root/gateway-upgrade.deb
for unit in gateway.socket gateway.service; do
  [ "$(in_container systemctl is-enabled $unit)" = enabled ] || fail "$unit not enabled after reinstall"
done
[ "$(count)" = "$count_kept" ] || fail "the count after reinstall is not the $count_kept kept"
answer=$(visit)
echo "GET / -> $answer"
[ "$answer" = "Welcome, upgraded!" ] || fail "not serving the kept config after reinstall"

echo "== apt-get purge gateway (running)"
apt purge gateway
in_container systemctl is-active gateway.service gateway.socket && fail "still running after purge"
[ -z "$(visit)" ] || fail "still answering after purge"
for left in /etc/gateway /var/lib/gateway /var/lib/private/gateway /usr/bin/gateway \
  /lib/systemd/system/gateway.service /etc/systemd/system/gateway.service /etc/systemd/system/gateway.socket \
  /etc/systemd/system/multi-user.target.wants/gateway.service /etc/systemd/system/sockets.target.wants/gateway.socket; do
  in_container test -e "$left" && fail "purge left $left behind"
done
in_container sh -c 'find /var/lib/systemd/deb-systemd-helper-* -name "*gateway*" 2>/dev/null | grep -q .' && fail "purge left deb-systemd-helper state behind"
echo "purge left nothing behind"

echo "== poweroff"
in_container systemctl poweroff || true
for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$nspawn_pid" 2>/dev/null && fail "container did not power off"
nspawn_pid=
echo "systemd container test: ok"
