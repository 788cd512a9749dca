#!/usr/bin/env bash
# Two Podman engines serving their Docker-compatible API, for the `podman` runner's
# tests. Runs as root on a Debian bookworm host, after .ci/setup-docker.sh (dockerd up
# with its cdi feature on; the made-up CDI spec of four fake GPUs in /etc/cdi).
#
# 1. Podman 5.4 (Debian trixie's), socket unix:///run/llem-podman/podman.sock.
#    Trixie's podman cannot be installed on bookworm (it wants libc6 2.41 and a
#    distribution upgrade), so it runs in a container of the host's dockerd:
#    a trixie root filesystem made with mmdebstrap (podman, crun, fuse-overlayfs,
#    nftables for netavark's bridge network), imported once as llem-ci/podman:trixie,
#    run as the long-lived container llem-ci-podman (--privileged, --restart always:
#    it comes back when a test suite restarts dockerd) serving
#    `podman system service --time=0`. It reads the host's /etc/cdi (read-only).
#    Its storage is the named volume llem-ci-podman-storage (kept across restarts and
#    re-creations of the container); its /run is a tmpfs (podman's runtime state must
#    not survive a restart). It is infrastructure: it carries no `llem.managed` label.
#    Bind mounts name paths of the Podman container's file system, not the host's:
#    host paths the tests hand to containers (exchange dirs, the helper script,
#    sources) must therefore be mounted into it at the same path. Shared: /tmp, the
#    repository's checkout, and every path in LLEM_PODMAN_SHARE (colon-separated).
#    A container that lacks one of them is made again (its images stay in the volume).
#    Test images are loaded into it from dockerd (`docker save | podman load`) when
#    missing. When the container is new, a `docker restart` proves the socket and the
#    images come back.
# 2. Podman 4.3 (Debian bookworm's own, apt), on the host, rootful, socket
#    unix:///run/llem-podman43/podman.sock, started in the background (pid in
#    /run/llem-podman43/podman.pid, log /var/log/llem-podman43.log). Its Docker API
#    ignores CDI DeviceRequests: it exists to show that a GPU study is refused on it.
#    Installed without recommends; it keeps the host's runc and does not touch dockerd.
#    Storage: the default /var/lib/containers/storage. Its containers.conf
#    (/run/llem-podman43/containers.conf, through CONTAINERS_CONF, for this service
#    only) caps RLIMIT_NOFILE and RLIMIT_NPROC at the host's hard limits (nproc also
#    at kernel.pid_max): its defaults (1048576 and 4194304) are above them here and
#    every container failed to start ("runc create failed: ... error setting rlimit
#    type 7: operation not permitted", then type 6).
# Idempotent: reuses the image, container, volume, daemon and images that exist.
set -euo pipefail

log() { printf '[setup-podman] %s\n' "$*" >&2; }

REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
PODMAN_IMAGE=llem-ci/podman:trixie
PODMAN_CONTAINER=llem-ci-podman
PODMAN_VOLUME=llem-ci-podman-storage
PODMAN_DIR=/run/llem-podman
PODMAN_SOCK="$PODMAN_DIR/podman.sock"
PODMAN43_DIR=/run/llem-podman43
PODMAN43_SOCK="$PODMAN43_DIR/podman.sock"
PODMAN43_LOG=/var/log/llem-podman43.log
BUSYBOX_IMAGE="${LLEM_TEST_BUSYBOX_IMAGE:-llem-test/busybox:latest}"
PYTHON_IMAGE="${LLEM_TEST_PYTHON_IMAGE:-llem-test/python:bookworm}"
# podman 5 on a cgroup v1 host warns on every command; cgroupfs: no systemd here.
PODMAN_FLAGS=(--cgroup-manager=cgroupfs --events-backend=file)

timings=()
step_start=0
begin() { step_start=$SECONDS; log "$1"; }
done_step() { timings+=("$1: $((SECONDS - step_start)) s"); }

ping_ok() { [ "$(curl -s -m 3 --unix-socket "$1" http://d/_ping 2>/dev/null)" = OK ]; }
wait_ping() {  # wait_ping SOCKET SECONDS: a deadline, whatever each probe costs
  local end=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$end" ]; do ping_ok "$1" && return 0; sleep 0.5; done
  return 1
}
version_of() {
  curl -s -m 5 --unix-socket "$1" http://d/version | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(v.get("Version"), "(API", str(v.get("ApiVersion")) + ", min", str(v.get("MinAPIVersion")) + ")")'
}

# The host paths to share with the Podman container (same path inside).
share=(/tmp "$REPO")
if [ -n "${LLEM_PODMAN_SHARE:-}" ]; then
  IFS=: read -r -a extra <<<"$LLEM_PODMAN_SHARE"
  share+=("${extra[@]}")
fi

# -- Podman 5.4 in a container ---------------------------------------------------------

begin "image $PODMAN_IMAGE"
if ! docker image inspect "$PODMAN_IMAGE" >/dev/null 2>&1; then
  work="$(mktemp -d /tmp/llem-podman.XXXXXX)"
  trap 'rm -rf "$work"' EXIT
  log "building $PODMAN_IMAGE with mmdebstrap from Debian trixie (about a minute)"
  mmdebstrap --quiet --variant=apt --include=podman,crun,fuse-overlayfs,nftables \
    trixie "$work/rootfs.tar"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PODMAN_IGNORE_CGROUPSV1_WARNING=1' \
    "$work/rootfs.tar" "$PODMAN_IMAGE" >/dev/null
  rm -rf "$work"
  trap - EXIT
fi
done_step "image"

begin "container $PODMAN_CONTAINER"
covered() {  # covered PATH: is PATH under a bind mount of the same path in the container?
  local src dest
  while read -r src dest; do
    [ -n "$dest" ] && [ "$src" = "$dest" ] && case "$1/" in "$dest"/*) return 0 ;; esac
  done < <(docker inspect -f '{{range .Mounts}}{{if eq .Type "bind"}}{{.Source}} {{.Destination}}{{"\n"}}{{end}}{{end}}' "$PODMAN_CONTAINER")
  return 1
}
created=no
if docker container inspect "$PODMAN_CONTAINER" >/dev/null 2>&1; then
  want_image="$(docker image inspect -f '{{.Id}}' "$PODMAN_IMAGE")"
  have_image="$(docker container inspect -f '{{.Image}}' "$PODMAN_CONTAINER")"
  missing=()
  for p in "${share[@]}"; do covered "$p" || missing+=("$p"); done
  if [ "$(docker container inspect -f '{{.State.Running}}' "$PODMAN_CONTAINER")" = true ]; then
    # A shared path deleted and made again (a new checkout at the same place) is another
    # directory: the container's bind mount still holds the old, deleted one.
    for p in "${share[@]}"; do
      [ "$(stat -c %i "$p")" = "$(docker exec "$PODMAN_CONTAINER" stat -c %i "$p" 2>/dev/null)" ] \
        || missing+=("$p (stale)")
    done
  fi
  if [ "$want_image" != "$have_image" ] || [ ${#missing[@]} -gt 0 ]; then
    log "re-creating $PODMAN_CONTAINER (image changed or paths not shared: ${missing[*]:-})"
    docker rm -f "$PODMAN_CONTAINER" >/dev/null
  elif [ "$(docker container inspect -f '{{.State.Running}}' "$PODMAN_CONTAINER")" != true ]; then
    log "starting the existing $PODMAN_CONTAINER"
    docker start "$PODMAN_CONTAINER" >/dev/null
  fi
fi
if ! docker container inspect "$PODMAN_CONTAINER" >/dev/null 2>&1; then
  mkdir -p "$PODMAN_DIR"
  mounts=(-v "$PODMAN_DIR:$PODMAN_DIR" -v /etc/cdi:/etc/cdi:ro -v "$PODMAN_VOLUME:/var/lib/containers")
  for p in "${share[@]}"; do
    [ -d "$p" ] || { log "LLEM_PODMAN_SHARE: $p is not a directory"; exit 1; }
    under=no  # a path under another shared one comes with it
    for q in "${share[@]}"; do
      [ "$q" != "$p" ] && case "$p/" in "$q"/*) under=yes ;; esac
    done
    [ "$under" = yes ] || mounts+=(-v "$p:$p")
  done
  log "running $PODMAN_CONTAINER (shares: ${share[*]})"
  docker run -d --name "$PODMAN_CONTAINER" --privileged --restart always \
    --tmpfs /run:rw,exec,mode=755 "${mounts[@]}" "$PODMAN_IMAGE" \
    sh -c "rm -f '$PODMAN_SOCK'; exec podman ${PODMAN_FLAGS[*]} system service --time=0 'unix://$PODMAN_SOCK'" \
    >/dev/null
  created=yes
fi
if ! wait_ping "$PODMAN_SOCK" 60; then
  log "Podman 5.4 did not answer on $PODMAN_SOCK within 60 s; its logs:"
  docker logs --tail 40 "$PODMAN_CONTAINER" >&2 || true
  exit 1
fi
done_step "container up"

begin "images in Podman 5.4"
for img in "$BUSYBOX_IMAGE" "$PYTHON_IMAGE"; do
  if ! docker exec "$PODMAN_CONTAINER" podman image exists "$img"; then
    log "loading $img"
    docker save "$img" | docker exec -i "$PODMAN_CONTAINER" podman load -q >/dev/null
  fi
done
done_step "images 5.4"

if [ "$created" = yes ]; then
  begin "restart check: docker restart $PODMAN_CONTAINER"
  docker restart -t 5 "$PODMAN_CONTAINER" >/dev/null
  if ! wait_ping "$PODMAN_SOCK" 60; then
    log "Podman 5.4 did not come back on $PODMAN_SOCK within 60 s after a restart; its logs:"
    docker logs --tail 40 "$PODMAN_CONTAINER" >&2 || true
    exit 1
  fi
  for img in "$BUSYBOX_IMAGE" "$PYTHON_IMAGE"; do
    docker exec "$PODMAN_CONTAINER" podman image exists "$img" \
      || { log "$img is gone after a restart: storage does not persist"; exit 1; }
  done
  done_step "restart check"
fi

# -- Podman 4.3 on the host ------------------------------------------------------------

begin "Podman 4.3 on the host"
if ! dpkg -s podman >/dev/null 2>&1; then
  log "installing Debian bookworm's podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman >/dev/null
fi
pid="$(cat "$PODMAN43_DIR/podman.pid" 2>/dev/null || true)"
ours() {  # the service we started, with its own containers.conf (an older one had none)
  # and `/` as its working directory: conmon inherits it, and a service started from a
  # checkout that is later deleted fails every start ("Failed to get working directory").
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = podman ] \
    && [ "$(readlink "/proc/$pid/cwd")" = / ] \
    && tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "CONTAINERS_CONF=$PODMAN43_DIR/containers.conf"
}
if ! ping_ok "$PODMAN43_SOCK" || ! ours; then
  mkdir -p "$PODMAN43_DIR"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = podman ]; then
    log "podman $pid does not answer, or runs without its containers.conf or outside /: stopping it"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PODMAN43_SOCK"
  # Podman 4.3 gives rootful containers RLIMIT_NOFILE 1048576, above this host's hard
  # limit: runc then fails ("error setting rlimit type 7: operation not permitted").
  # Its own containers.conf (CONTAINERS_CONF, for this service only) caps it.
  # The same for RLIMIT_NPROC ("rlimit type 6"), which podman lowers for itself to
  # kernel.pid_max (32768 here) below the shell's hard limit.
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"; pid_max="$(cat /proc/sys/kernel/pid_max)"
  [ "$nofile" = unlimited ] && nofile=1048576
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; } && nproc="$pid_max"
  printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
    "$nofile" "$nofile" "$nproc" "$nproc" >"$PODMAN43_DIR/containers.conf"
  log "starting podman 4.3 (log: $PODMAN43_LOG; nofile $nofile, nproc $nproc)"
  CONTAINERS_CONF="$PODMAN43_DIR/containers.conf" setsid env -C / nohup podman "${PODMAN_FLAGS[@]}" system service --time=0 "unix://$PODMAN43_SOCK" \
    >"$PODMAN43_LOG" 2>&1 &
  echo $! >"$PODMAN43_DIR/podman.pid"
  if ! wait_ping "$PODMAN43_SOCK" 60; then
    log "Podman 4.3 did not answer on $PODMAN43_SOCK within 60 s; its log:"
    tail -n 40 "$PODMAN43_LOG" >&2 || true
    exit 1
  fi
fi
if ! podman "${PODMAN_FLAGS[@]}" image exists "$BUSYBOX_IMAGE"; then
  log "loading $BUSYBOX_IMAGE"
  docker save "$BUSYBOX_IMAGE" | podman "${PODMAN_FLAGS[@]}" load -q >/dev/null
fi
done_step "podman 4.3"

log "Podman 5.4: unix://$PODMAN_SOCK $(version_of "$PODMAN_SOCK")"
log "Podman 4.3: unix://$PODMAN43_SOCK $(version_of "$PODMAN43_SOCK")"
log "times: ${timings[*]/%/;}"
