#!/usr/bin/env bash
# Installs and starts what the integration tests need on a Debian host:
# docker.io (dockerd), busybox-static and mmdebstrap, then builds the local
# test images (no registry is reachable, so nothing can be pulled).
# Idempotent: reuses a running daemon and images that already exist.
set -euo pipefail

log() { printf '[setup-docker] %s\n' "$*" >&2; }

BUSYBOX_IMAGE="${LLEM_TEST_BUSYBOX_IMAGE:-llem-test/busybox:latest}"
PYTHON_IMAGE="${LLEM_TEST_PYTHON_IMAGE:-llem-test/python:bookworm}"
SOCKET=/var/run/docker.sock

# Debian bookworm's docker.io (20.10.24) deadlocks under our own container churn
# (moby/moby#46661, moby/libnetwork#2649; see DESIGN.md). Debian trixie's 26.1.5
# runs on bookworm (it needs libc6 >= 2.34; bookworm has 2.36) and keeps
# bookworm's runc, tini and iptables: fetch just its three packages from a
# separate, trixie-only apt configuration, and let apt resolve the rest here.
ENGINE_MIN_MAJOR=23
TRIXIE_PACKAGES=(docker.io docker-cli containerd)

engine_major() {
  local v
  v=$(dockerd --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
  echo "${v:-0}"
}

install_trixie_engine() {
  local apt_dir="$1/apt" opts
  mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$1/debs"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    >"$apt_dir/parts/trixie.sources"
  opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/parts"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  log "fetching Docker Engine 26 from Debian trixie: ${TRIXIE_PACKAGES[*]}"
  apt-get "${opts[@]}" update -qq
  (cd "$1/debs" && apt-get "${opts[@]}" download "${TRIXIE_PACKAGES[@]}" 2>/dev/null)
  stop_dockerd
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq  # bookworm's lists, for runc, tini and iptables
  apt-get install -y -qq --no-install-recommends "$1"/debs/*.deb >/dev/null
}

stop_dockerd() {  # the old engine must not hold the socket or the data dir
  local p
  for p in $(pgrep -x dockerd || true); do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 60); do pgrep -x dockerd >/dev/null || break; sleep 0.5; done
  for p in $(pgrep -x dockerd || true); do kill -9 "$p" 2>/dev/null || true; done
  pkill -x containerd 2>/dev/null || true
  rm -f /var/run/docker.pid /var/run/docker.sock
}

need=()
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$(engine_major)" -lt "$ENGINE_MIN_MAJOR" ]; then
  engine_work="$(mktemp -d /tmp/llem-engine.XXXXXX)"
  install_trixie_engine "$engine_work"
  rm -rf "$engine_work"
fi


# CDI (GPUs named by UUID): the engine's `cdi` feature on, and a made-up spec of four
# fake GPUs in /etc/cdi (this machine has none) so tests see which devices a
# container really got. Merged into an existing daemon.json, never overwriting it.
CDI_SPEC_SRC="$(dirname "$0")/cdi/llem-test-gpu.yaml"
mkdir -p /etc/cdi /etc/docker
cp "$CDI_SPEC_SRC" /etc/cdi/llem-test-gpu.yaml
cdi_changed=$(python3 - <<'PY'
import json, os
path = "/etc/docker/daemon.json"
conf = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
if conf.get("features", {}).get("cdi") is True:
    print("no")
else:
    conf.setdefault("features", {})["cdi"] = True
    with open(path + ".tmp", "w") as f:
        json.dump(conf, f, indent=2)
    os.replace(path + ".tmp", path)
    print("yes")
PY
)

daemon_up() { timeout 5 docker -H "unix://$SOCKET" version >/dev/null 2>&1; }
# Alive and not a zombie (a killed daemon can linger as one until reaped).
alive() {
  local state
  state=$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}
live_dockerd() { for p in $(pgrep -x dockerd || true); do alive "$p" && echo "$p"; done; true; }
wait_up() {  # wait_up SECONDS: a deadline, whatever each probe costs
  local end=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$end" ]; do daemon_up && return 0; sleep 0.5; done
  return 1
}

cdi_on() { [ "$(docker -H "unix://$SOCKET" info --format '{{len .CDISpecDirs}}' 2>/dev/null || echo 0)" -gt 0 ]; }
if daemon_up && { [ "$cdi_changed" = yes ] || ! cdi_on; }; then
  log "restarting dockerd to turn on its cdi feature"
  stop_dockerd
fi
if ! daemon_up; then
  running="$(live_dockerd)"
  if [ -n "$running" ] && ! wait_up 30; then
    log "dockerd $running does not answer: killing it"
    kill -9 $running 2>/dev/null || true
    for _ in $(seq 1 40); do [ -z "$(live_dockerd)" ] && break; sleep 0.25; done
    running=""
  fi
  if [ -z "$running" ]; then
    # A previous daemon may have left its pid files and socket behind.
    for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
      if [ -f "$pidfile" ] && ! alive "$(cat "$pidfile")"; then
        log "removing stale $pidfile"; rm -f "$pidfile"
      fi
    done
    if [ -S "$SOCKET" ]; then
      log "removing stale $SOCKET"; rm -f "$SOCKET"
    fi
    log "starting dockerd (log: /var/log/llem-dockerd.log)"
    # From `/`: a daemon must not keep the checkout (which may be deleted) as its cwd.
    env -C / nohup dockerd >/var/log/llem-dockerd.log 2>&1 &
  fi
  if ! wait_up 60; then
    log "dockerd did not answer within 60 s; last log lines:"
    tail -n 30 /var/log/llem-dockerd.log >&2 || true
    exit 1
  fi
fi
log "daemon up: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
if ! cdi_on; then
  log "dockerd runs without CDI although /etc/docker/daemon.json turns it on"; exit 1
fi
log "CDI on: spec dirs $(docker info --format '{{json .CDISpecDirs}}')"

work="$(mktemp -d /tmp/llem-images.XXXXXX)"
trap 'rm -rf "$work"' EXIT

if ! docker image inspect "$BUSYBOX_IMAGE" >/dev/null 2>&1; then
  log "building $BUSYBOX_IMAGE from busybox-static"
  mkdir -p "$work/bb/bin" "$work/bb/tmp" "$work/bb/etc"
  cp /bin/busybox "$work/bb/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/bb/bin/$applet"
  done
  chmod 1777 "$work/bb/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$work/bb/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/bb/etc/group"
  tar -C "$work/bb" -c . | docker import \
    --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$BUSYBOX_IMAGE" >/dev/null
fi

if ! docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  log "building $PYTHON_IMAGE with mmdebstrap (about a minute)"
  mmdebstrap --quiet --variant=apt --include=python3,python3-numpy \
    bookworm "$work/rootfs.tar"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' "$work/rootfs.tar" "$PYTHON_IMAGE" >/dev/null
fi
log "images ready: $BUSYBOX_IMAGE $PYTHON_IMAGE"
