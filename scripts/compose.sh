#!/usr/bin/env bash
# The lab's topology in containers, built and run without any image registry (docs/compose.md).
#
#   scripts/compose.sh build        base image (debootstrap + docker import), wheelhouse, the lab image
#   scripts/compose.sh up           build, then start the stack and wait until every service is healthy
#   scripts/compose.sh run [T...]   up (unless it is), then the runner service: the catalogue against each target profile T
#                                   (docker/targets/T.yaml; default: appliance postfix-may); reports are copied
#                                   to ./smtplab-report-compose/T/; exits with the run's exit code
#   scripts/compose.sh down [--all] remove the stack and its images, stop the daemon we started, restore the host;
#                                   --all also removes the caches (base rootfs tarball, wheelhouse)
#
# Needs root and Debian's docker.io, docker-compose and debootstrap. The Docker daemon is always our own one:
# started in a network namespace of its own (so its bridges and the topology's addresses never reach the
# machine's root namespace), with its data, exec root, PID file and socket under $SMTPLAB_COMPOSE_STATE
# (default .compose/ in the repository), and stopped by its PID. A system Docker, if any, is never touched.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SMTPLAB_COMPOSE_STATE:-$REPO/.compose}
REPORTS=${SMTPLAB_COMPOSE_REPORTS:-$PWD/smtplab-report-compose}
DOCKER=/usr/bin/docker # Debian's client: /usr/local/bin/docker may be another one
COMPOSE=/usr/bin/docker-compose
DOCKERD=/usr/sbin/dockerd
PROJECT=smtplab
BASE_IMAGE=smtplab-base:bookworm
LAB_IMAGE=smtplab-lab:local
BASE_PACKAGES=python3,python3-venv,postfix,iproute2,ca-certificates
RUNNER=smtplab-runner # the runner's container name while its reports are copied out
export DOCKER_HOST=unix://$STATE/docker.sock
export COMPOSE_DOCKER_CLI_BUILD=0 # compose builds through the daemon's API, not whichever `docker` is on PATH

say() { echo "compose.sh: $*" >&2; }
die() {
  say "$*"
  exit 2
}
compose() { "$COMPOSE" --project-directory "$REPO" -f "$REPO/docker-compose.yml" -p "$PROJECT" "$@"; }

need_tools() {
  [ "$(id -u)" = 0 ] || die "needs root (it runs its own Docker daemon)"
  local tool
  for tool in "$DOCKER" "$COMPOSE" "$DOCKERD" /usr/sbin/debootstrap /usr/bin/unshare; do
    [ -x "$tool" ] || die "$tool not found: apt-get install docker.io docker-compose debootstrap"
  done
}

# -- the host's state: what the daemon could change in the root namespace, saved once, restored by `down`

host_state() {
  echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
  echo "forward_policy=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
}

save_host_state() {
  [ -f "$STATE/host.before" ] || host_state >"$STATE/host.before"
}

restore_host_state() {
  [ -f "$STATE/host.before" ] || return 0
  local ip_forward forward_policy
  ip_forward=$(sed -n 's/^ip_forward=//p' "$STATE/host.before")
  forward_policy=$(sed -n 's/^forward_policy=//p' "$STATE/host.before")
  if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$ip_forward" ]; then
    echo "$ip_forward" >/proc/sys/net/ipv4/ip_forward
    say "restored net.ipv4.ip_forward = $ip_forward"
  fi
  if [ -n "$forward_policy" ] && [ "$(host_state | sed -n 's/^forward_policy=//p')" != "$forward_policy" ]; then
    iptables -P FORWARD "$forward_policy"
    say "restored the iptables FORWARD policy $forward_policy"
  fi
  rm -f "$STATE/host.before"
}

# -- our own Docker daemon

daemon_pid() {
  local pid
  pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$DOCKERD" ] && echo "$pid"
}

start_daemon() {
  if daemon_pid >/dev/null; then return 0; fi
  mkdir -p "$STATE"
  save_host_state
  say "starting dockerd in a network namespace of its own (log: $STATE/dockerd.log)"
  # unshare execs sh, sh execs dockerd: one process, whose PID the daemon writes to its --pidfile. The namespace
  # has no link out, so it is the isolation: no iptables rules, no forwarding there (only the firewall
  # service routes, between the topology's networks).
  setsid unshare --net sh -c 'ip link set lo up && exec "$0" "$@"' "$DOCKERD" \
    --data-root "$STATE/docker" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
    -H "$DOCKER_HOST" --bridge=none --iptables=false --ip-forward=false --storage-driver=overlay2 \
    >"$STATE/dockerd.log" 2>&1 </dev/null &
  local _
  for _ in $(seq 60); do
    if "$DOCKER" version >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  tail -5 "$STATE/dockerd.log" >&2
  die "dockerd did not answer on $DOCKER_HOST within 30 s"
}

stop_daemon() {
  local pid _
  pid=$(daemon_pid) || return 0
  kill -TERM "$pid"
  for _ in $(seq 60); do
    [ -d "/proc/$pid" ] || break
    sleep 0.5
  done
  if [ -d "/proc/$pid" ]; then
    say "dockerd $pid did not stop within 30 s: SIGKILL"
    kill -KILL "$pid"
  fi
  say "stopped dockerd $pid"
}

# -- images

# The Debian mirror this machine's apt already uses: the first deb entry for the running release's codename in
# /etc/apt/sources.list.d/*.sources (deb822) or /etc/apt/sources.list[.d/*.list] (one-line format).
apt_mirror() {
  local codename file
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    awk -v suite="$codename" '
      /^[ \t]*$/ { if (deb && hit && uri) { print uri; exit } deb = hit = 0; uri = ""; next }
      /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      END { if (deb && hit && uri) print uri }' "$file" | head -1
  done | head -1 | grep . && return 0
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v suite="$codename" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++
      if ($(i + 1) == suite) { print $i; exit } }' | grep .
}

base_image() {
  "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local tarball="$STATE/base-bookworm.tar"
  if [ ! -s "$tarball" ]; then
    local mirror rootfs="$STATE/rootfs"
    mirror=$(apt_mirror) || die "no Debian mirror found in /etc/apt/sources.list{,.d/*}"
    say "debootstrap bookworm ($BASE_PACKAGES) from $mirror"
    rm -rf "$rootfs"
    /usr/sbin/debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$mirror" \
      >"$STATE/debootstrap.log" 2>&1 || {
      tail -5 "$STATE/debootstrap.log" >&2
      die "debootstrap failed (log: $STATE/debootstrap.log)"
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  say "docker import $tarball as $BASE_IMAGE"
  "$DOCKER" import "$tarball" "$BASE_IMAGE" >/dev/null
}

wheelhouse() {
  say "pip wheel: the project and its dependencies into docker/wheelhouse"
  rm -rf "$REPO/docker/wheelhouse" "$REPO/docker/peers"
  python3 -m pip wheel -q --no-cache-dir "$REPO" -w "$REPO/docker/wheelhouse" 2>&1 | grep -v "is ignored" >&2 || true
  ls "$REPO"/docker/wheelhouse/smtplab-*.whl >/dev/null 2>&1 || die "pip wheel did not build the smtplab wheel"
  mkdir -p "$REPO/docker/peers"
  cp "$REPO"/tests/peers/__init__.py "$REPO"/tests/peers/postfix.py "$REPO/docker/peers/"
}

build() {
  need_tools
  start_daemon
  base_image
  wheelhouse
  say "building $LAB_IMAGE"
  compose build -q esa
}

# -- the stack

wait_healthy() {
  local service id status _
  for service in esa firewall postfix mail-internal; do
    id=$(compose ps -q "$service")
    [ -n "$id" ] || die "service $service is not running"
    for _ in $(seq 120); do
      status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$id")
      [ "$status" = healthy ] && break
      sleep 0.5
    done
    [ "$status" = healthy ] || {
      compose logs --tail 20 "$service" >&2
      die "service $service is $status after 60 s"
    }
  done
  say "every service is healthy"
}

up() {
  build
  compose up -d esa firewall postfix mail-internal
  wait_healthy
}

stack_running() {
  daemon_pid >/dev/null && [ -n "$(compose ps -q esa 2>/dev/null)" ]
}

run() {
  if stack_running; then wait_healthy; else up; fi
  "$DOCKER" rm -f "$RUNNER" >/dev/null 2>&1 || true
  local code=0
  compose run --name "$RUNNER" runner smtplab-runner "$@" || code=$?
  local copied report
  copied=$(mktemp -d)
  if "$DOCKER" cp "$RUNNER:/reports/." "$copied" 2>/dev/null; then
    mkdir -p "$REPORTS"
    for report in "$copied"/*; do # one directory per target: replaces that target's previous report only
      [ -e "$report" ] || continue
      rm -rf "${REPORTS:?}/$(basename "$report")"
      mv "$report" "$REPORTS/"
    done
    say "reports copied to $REPORTS"
  else
    say "the runner left no reports"
  fi
  rm -rf "$copied"
  "$DOCKER" rm -f "$RUNNER" >/dev/null
  return "$code"
}

down() {
  need_tools
  if daemon_pid >/dev/null; then
    "$DOCKER" rm -f "$RUNNER" >/dev/null 2>&1 || true
    compose --profile run down --volumes --remove-orphans
    "$DOCKER" rmi "$LAB_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true # the data root goes below anyway
    stop_daemon
  fi
  # a daemon that died without cleaning up leaves its overlay mounts: unmount them, deepest first, before rm
  awk -v root="$STATE/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | while read -r mount; do
    umount "$mount"
  done
  rm -rf "$STATE/docker" "$STATE/exec" "$STATE/dockerd.pid" "$STATE/rootfs"
  restore_host_state
  if [ "${1:-}" = --all ]; then
    rm -rf "$STATE" "$REPO/docker/wheelhouse" "$REPO/docker/peers"
    say "removed the caches ($STATE, docker/wheelhouse)"
  fi
}

case "${1:-}" in
build | up | down)
  command=$1
  shift
  "$command" "$@"
  ;;
run)
  shift
  run "$@"
  ;;
*)
  echo "usage: $0 build | up | run [TARGET...] | down [--all]" >&2
  exit 3
  ;;
esac
