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
#   - HTTPS under the hardened unit, both ways docs/tls.md ("Under
#     the hardened unit") gives: 1. a key 0640 root:ssl-cert, read through
#     a `SupplementaryGroups=ssl-cert` drop-in (and not without it),
#     renewed by `systemctl reload` in the same process, a broken key on
#     reload leaving the old certificate serving; 2. `LoadCredential=` of
#     a key only root reads, which a reload does not refresh and
#     `systemctl restart` does, under load without a failed request;
#   - a bad config exits 78 and is not restarted (NRestarts stays 0);
#   - `gateway-bench` measures the installed gateway (a one-second run);
#   - an upgrade to a higher version under load fails no request, keeps an
#     edited config and the count, and restarts the service;
#   - `apt-get remove gateway` stops it and keeps its config and count; a
#     reinstall runs again on them; `apt-get purge gateway` of the running
#     package stops it and leaves no config, no state, no unit links.
# Needs root, debootstrap, systemd-container and openssl (the test's
# certificates are made on the host). The Debian root is cached
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
command -v openssl >/dev/null || { echo "needs openssl on this host, for the HTTPS checks' certificates"; exit 1; }

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

# The HTTPS checks' certificates, made here because the container has no
# openssl: a CA, and leaves for localhost with serials (hex) 1001 and its
# renewal 1002 (way 1), 1003 and its renewal 1004 (way 2). They go into the
# container's /root/pki, and with it away at the end.
pki=$root/root/pki
mkdir -m 0700 "$pki"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$pki/leaf.ext"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=gateway-ci-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>"$pki/openssl.log" \
  || { cat "$pki/openssl.log"; echo "openssl: could not make the test CA"; exit 1; }
for serial in 1001 1002 1003 1004; do
  { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
      -keyout "$pki/$serial.key" -out "$pki/$serial.csr" \
    && openssl x509 -req -in "$pki/$serial.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
      -set_serial "0x$serial" -days 1 -extfile "$pki/leaf.ext" -out "$pki/$serial.pem"; } 2>"$pki/openssl.log" \
    || { cat "$pki/openssl.log"; echo "openssl: could not make the certificate $serial"; exit 1; }
done

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

# Visits in a loop until stopped, expecting `$1` as the answer, with the
# rest as curl's arguments (default: http://127.0.0.1:3000/); then `ok`
# and `failed` hold what they got.
start_load() {
  local expected=$1
  shift
  [ $# -gt 0 ] || set -- http://127.0.0.1:3000/
  in_container rm -f /root/load.stop /root/load.result
  in_container sh -c '
    expected=$1; shift
    ok=0; failed=0
    while [ ! -e /root/load.stop ]; do
      if [ "$(curl -sS --max-time 10 "$@" 2>/dev/null)" = "$expected" ]; then
        ok=$((ok + 1)); else failed=$((failed + 1)); fi
    done
    echo "$ok $failed" > /root/load.result' sh "$expected" "$@" &
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

# HTTPS: the gateway's answer and the serial number of the certificate a
# new connection gets (from curl's report of the chain: the container has
# no openssl), trusting the test CA.
ca=/root/pki/ca.pem
visit_tls() { in_container curl -sS --max-time 5 --cacert "$ca" https://localhost:3000/ 2>/dev/null || true; }
serial() {
  local certs
  certs=$(in_container curl -sS --max-time 5 -o /dev/null -w '%{certs}' --cacert "$ca" https://localhost:3000/ 2>/dev/null || true)
  sed -n '/^Serial Number:/{s/^Serial Number: *//p;q}' <<<"$certs"
}
# The gateway's journal lines matching $1: how many, and the last.
journal_count() { in_container journalctl -u gateway --no-pager -o cat | grep -cE "$1" || true; }
journal_last() { in_container journalctl -u gateway --no-pager -o cat | grep -E "$1" | tail -n 1 || true; }
# `systemctl reload` returns once the signal is sent (systemd 252 has no
# Type=notify-reload): wait, 10 s at most, for more than $2 lines matching
# $1, and for the unit to be back from "reloading".
wait_reload() {
  local _
  for _ in $(seq 50); do
    [ "$(journal_count "$1")" -gt "$2" ] && break
    sleep 0.2
  done
  [ "$(journal_count "$1")" -gt "$2" ] || return 1
  for _ in $(seq 50); do
    [ "$(in_container systemctl is-active gateway || true)" = active ] && return 0
    sleep 0.2
  done
  return 1
}
# Serves HTTPS after a (re)start: the welcome, within 5 s.
expect_tls_welcome() {
  local answer _
  answer=$(visit_tls)
  for _ in $(seq 50); do [ "$answer" = "Welcome to my site!" ] && break; sleep 0.1; answer=$(visit_tls); done
  echo "GET https://localhost:3000/ -> $answer"
  [ "$answer" = "Welcome to my site!" ] || fail "$1: no welcome over HTTPS"
}
reloaded='reloaded applied=server.tls_cert'
dropin=$root/etc/systemd/system/gateway.service.d/tls.conf

echo "== HTTPS, way 1: key 0640 root:ssl-cert, SupplementaryGroups=ssl-cert, renewed by systemctl reload"
in_container cp /etc/gateway/config.toml /root/config.http
# What Debian's ssl-cert package does (not in the container, whose network is private).
in_container groupadd --system ssl-cert
in_container install -d -m 0755 /etc/gateway/tls
in_container install -m 0644 /root/pki/1001.pem /etc/gateway/tls/fullchain.pem
in_container install -m 0640 -g ssl-cert /root/pki/1001.key /etc/gateway/tls/privkey.pem
in_container sed -i 's|^\[server\]$|&\ntls_cert = "/etc/gateway/tls/fullchain.pem"\ntls_key = "/etc/gateway/tls/privkey.pem"|' /etc/gateway/config.toml
[ "$(in_container grep -c '^tls_' /etc/gateway/config.toml)" = 2 ] || fail "the TLS keys did not go into [server]"
# The certificate is public (0644); the group's read is what lets the
# dynamic user at the key: without the drop-in the start fails on it.
in_container systemctl restart gateway 2>/dev/null && fail "started without the group, on a key 0640 root:ssl-cert"
status=$(in_container systemctl show gateway -p ExecMainStatus --value)
why=$(journal_last 'configuration error')
echo "without the drop-in: exit status $status; $why"
[ "$status" = 78 ] || fail "exit status $status, not 78, on a key it cannot read"
grep -q 'privkey.pem: Permission denied' <<<"$why" || fail "not failing on the key's permission"
in_container systemctl reset-failed gateway
mkdir -p "$(dirname "$dropin")"
cat >"$dropin" <<'UNIT'
[Service]
SupplementaryGroups=ssl-cert
UNIT
in_container systemctl daemon-reload
in_container systemctl restart gateway || fail "did not start with SupplementaryGroups=ssl-cert"
expect_tls_welcome "SupplementaryGroups=ssl-cert"
[ "$(serial)" = 1001 ] || fail "serving serial '$(serial)', not 1001"
echo "serving serial 1001"
in_container systemd-analyze security --threshold=12 gateway.service | tail -n 1 \
  || fail "the exposure with the drop-in is above 1.2"

echo "-- renewed in place: new files, systemctl reload"
pid_before=$(in_container systemctl show gateway -p MainPID --value)
in_container install -m 0644 /root/pki/1002.pem /etc/gateway/tls/fullchain.pem
in_container install -m 0640 -g ssl-cert /root/pki/1002.key /etc/gateway/tls/privkey.pem
seen=$(journal_count "$reloaded")
in_container systemctl reload gateway || fail "systemctl reload gateway"
wait_reload "$reloaded" "$seen" || fail "no '$reloaded' line, or not active, 10 s after systemctl reload"
journal_last "$reloaded"
pid_after=$(in_container systemctl show gateway -p MainPID --value)
echo "main pid $pid_before before, $pid_after after; now serial $(serial)"
[ "$pid_after" = "$pid_before" ] || fail "the reload replaced the process"
[ "$(serial)" = 1002 ] || fail "a new connection after the reload got serial '$(serial)', not the renewed 1002"
expect_tls_welcome "after the reload"

echo "-- a broken key on reload: the old certificate stays"
in_container sh -c 'echo "not a key" > /etc/gateway/tls/privkey.pem'
seen=$(journal_count 'reload failed')
in_container systemctl reload gateway || fail "systemctl reload gateway (broken key)"
wait_reload 'reload failed' "$seen" || fail "no 'reload failed' line, or not active, 10 s after reloading a broken key"
journal_last 'reload failed'
[ "$(in_container systemctl show gateway -p MainPID --value)" = "$pid_before" ] || fail "the failed reload replaced the process"
[ "$(serial)" = 1002 ] || fail "after a failed reload serving serial '$(serial)', not the 1002 in use"
expect_tls_welcome "after the failed reload"
echo "still serving serial 1002"

echo "== HTTPS, way 2: LoadCredential= of a key only root reads, renewed by systemctl restart"
in_container rm -rf /etc/gateway/tls
in_container install -d -m 0700 /etc/gateway/tls
in_container install -m 0600 /root/pki/1003.pem /etc/gateway/tls/fullchain.pem
in_container install -m 0600 /root/pki/1003.key /etc/gateway/tls/privkey.pem
cat >"$dropin" <<'UNIT'
[Service]
LoadCredential=tls.crt:/etc/gateway/tls/fullchain.pem
LoadCredential=tls.key:/etc/gateway/tls/privkey.pem
UNIT
in_container sed -i -e 's|^tls_cert = .*|tls_cert = "/run/credentials/gateway.service/tls.crt"|' \
  -e 's|^tls_key = .*|tls_key = "/run/credentials/gateway.service/tls.key"|' /etc/gateway/config.toml
in_container systemctl daemon-reload
in_container systemctl restart gateway || fail "did not start with LoadCredential="
expect_tls_welcome "LoadCredential="
[ "$(serial)" = 1003 ] || fail "serving serial '$(serial)', not 1003"
echo "serving serial 1003"
in_container systemd-analyze security --threshold=12 gateway.service | tail -n 1 \
  || fail "the exposure with the drop-in is above 1.2"
in_container install -m 0600 /root/pki/1004.pem /etc/gateway/tls/fullchain.pem
in_container install -m 0600 /root/pki/1004.key /etc/gateway/tls/privkey.pem
# systemd copies credentials at start only: the reload reads the old copy.
seen=$(journal_count "$reloaded")
in_container systemctl reload gateway || fail "systemctl reload gateway (credentials)"
wait_reload "$reloaded" "$seen" || fail "no '$reloaded' line, or not active, 10 s after systemctl reload"
journal_last "$reloaded"
echo "after systemctl reload: serial $(serial) (the credential is the copy made at start)"
[ "$(serial)" = 1003 ] || fail "the reload refreshed the credential: docs/tls.md's way 2 says it does not"
pid_before=$(in_container systemctl show gateway -p MainPID --value)
start_load "Welcome to my site!" --cacert "$ca" https://localhost:3000/
in_container systemctl restart gateway
stop_load
pid_after=$(in_container systemctl show gateway -p MainPID --value)
echo "HTTPS requests during systemctl restart: $ok ok, $failed failed; main pid $pid_before before, $pid_after after; now serial $(serial)"
[ "$failed" = 0 ] && [ "$ok" -gt 0 ] || fail "HTTPS requests failed across the restart"
[ "$pid_after" != "$pid_before" ] || fail "systemctl restart did not replace the process"
[ "$(serial)" = 1004 ] || fail "after the restart serving serial '$(serial)', not the renewed 1004"

echo "== back to plain HTTP"
rm -rf "$(dirname "$dropin")"
in_container rm -rf /etc/gateway/tls
in_container cp /root/config.http /etc/gateway/config.toml
in_container systemctl daemon-reload
in_container systemctl restart gateway
answer=$(visit)
echo "GET http://127.0.0.1:3000/ -> $answer"
[ "$answer" = "Welcome to my site!" ] || fail "not serving plain HTTP again"

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
