#!/usr/bin/env bash
# Build the CPU image with podman on a machine with no Docker engine and no image registry, run it,
# and check it end to end: /health, one completion, graceful stop on SIGTERM.
# Needs root (apt-get; rootful podman with runc, cgroupfs and the vfs storage driver, which work inside
# a container without systemd or overlay support).
#
#   bash docker/build-cpu-local.sh            # build + run + check
#   bash docker/build-cpu-local.sh --build-only
#   CLEAN=1 bash docker/build-cpu-local.sh    # same, then remove the images (vfs layers use disk)
#
# Env: IMAGE (default localhost/smollm2-server:cpu), PORT (host port, default: a free one),
#      WORK (debootstrap folder, default /var/tmp/smollm2-podman), HEALTH_TIMEOUT (s, default 300),
#      TORCH_WHEEL (a local CPU torch 2.13.0 wheel; default: torch==2.13.0 from the PyTorch CPU index),
#      CONTAINERS_CONF / CONTAINERS_STORAGE_CONF (podman's own; default: the settings written below).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/smollm2-server:cpu}
# The name the Dockerfile's FROM gets for a CPU build; the local debootstrap image is tagged with it.
CPU_BASE=docker.io/library/debian:bookworm-slim
WORK=${WORK:-/var/tmp/smollm2-podman}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
NAME=smollm2-cpu-check-$$
CA=/etc/ssl/certs/ca-certificates.crt

log() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

install_tools() {
  local missing=()
  for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq podman buildah debootstrap runc >/dev/null
  fi
  mkdir -p "$WORK/podman"
  if [[ -z ${CONTAINERS_CONF:-} ]]; then
    export CONTAINERS_CONF=$WORK/podman/containers.conf
    printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' \
      >"$CONTAINERS_CONF"
  fi
  if [[ -z ${CONTAINERS_STORAGE_CONF:-} ]]; then
    export CONTAINERS_STORAGE_CONF=$WORK/podman/storage.conf
    printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
      >"$CONTAINERS_STORAGE_CONF"
  fi
}

make_base() {
  if podman image exists "$CPU_BASE"; then log "base $CPU_BASE already present"; return; fi
  mkdir -p "$WORK"
  if ! podman image exists localhost/debian:bookworm-min; then
    local mirror
    # The host's own Debian mirror where it has one (it may be the only one reachable).
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    if [[ ! -x $WORK/rootfs/usr/bin/apt-get ]]; then
      log "debootstrap bookworm from $mirror (about a minute)"
      rm -rf "$WORK/rootfs"
      debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log"
    fi
    tar -C "$WORK/rootfs" -c . | podman import - localhost/debian:bookworm-min
  fi
  log "adding python3 to the base, tagging it $CPU_BASE"
  printf 'FROM localhost/debian:bookworm-min\nRUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*\n' \
    >"$WORK/Containerfile.base"
  podman build --pull=never -t localhost/debian:bookworm-python -f "$WORK/Containerfile.base" "$WORK"
  podman tag localhost/debian:bookworm-python "$CPU_BASE"
}

build_image() {
  local torch_args=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg TORCH_SPEC=torch==2.13.0)
  if [[ -n ${TORCH_WHEEL:-} ]]; then
    [[ -f $TORCH_WHEEL ]] || fail "TORCH_WHEEL=$TORCH_WHEEL: no such file"
    cp -u "$TORCH_WHEEL" "$REPO/docker/wheels/"
    # Torch's own dependencies come from PyPI; the wheel comes from the build context.
    torch_args=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple
                --build-arg TORCH_SPEC="/tmp/wheels/$(basename "$TORCH_WHEEL")")
  fi
  log "building $IMAGE (torch: ${TORCH_WHEEL:-torch==2.13.0 from the PyTorch CPU index})"
  # --format docker keeps HEALTHCHECK (the OCI format drops it).
  podman build --pull=never --format docker -t "$IMAGE" \
    -v "$CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt \
    --build-arg BASE_IMAGE="$CPU_BASE" --build-arg CPU_KERNELS=true "${torch_args[@]}" \
    "$REPO"
}

# Extra checks of the server's log after the stop; the GPU script overrides this.
check_logs() { :; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_healthy() {
  local url=$1 deadline=$((SECONDS + HEALTH_TIMEOUT))
  until python3 -c "import urllib.request; urllib.request.urlopen('$url/health', timeout=3)" 2>/dev/null; do
    [[ $(podman inspect -f '{{.State.Running}}' "$NAME") == true ]] || { podman logs "$NAME" | tail -40; fail "container exited before /health"; }
    ((SECONDS < deadline)) || { podman logs "$NAME" | tail -40; fail "/health not 200 after ${HEALTH_TIMEOUT}s"; }
    sleep 2
  done
}

# One completion through the published port; prints the text, fails unless tokens came back.
check_completion() {
  python3 - "$1" <<'PY'
import json, sys, urllib.request
base = sys.argv[1]
models = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))["data"]
body = {"model": models[0]["id"], "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=120))
text, usage = out["choices"][0]["text"], out["usage"]
print(f"model={models[0]['id']} text={text!r} usage={usage}")
assert usage["completion_tokens"] > 0 and text.strip(), "empty completion"
PY
}

run_and_check() {
  local port=${PORT:-$(free_port)}
  local url=http://127.0.0.1:$port
  log "running $IMAGE on $url"
  podman run -d --name "$NAME" --gpus all -p "127.0.0.1:$port:8000" "$IMAGE" >/dev/null
  trap 'podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
  local t0=$SECONDS
  wait_healthy "$url"
  log "/health 200 after $((SECONDS - t0))s; container HEALTHCHECK: $(podman healthcheck run "$NAME" >/dev/null 2>&1 && echo healthy || echo unhealthy)"
  check_completion "$url" || { podman logs "$NAME" | tail -40; fail "completion check"; }
  log "stopping with SIGTERM"
  t0=$SECONDS
  podman stop -t 40 "$NAME" >/dev/null
  local code
  code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
  log "stopped after $((SECONDS - t0))s, exit code $code; last log lines:"
  podman logs "$NAME" 2>&1 | tail -5
  # uvicorn re-raises SIGTERM after its drain, so 143 (128+15) is a clean stop; 137 means SIGKILL.
  [[ $code == 0 || $code == 143 ]] || fail "exit code $code after SIGTERM (137 = killed before draining)"
  # Read the logs whole first: `podman logs | grep -q` fails under pipefail when grep stops reading early.
  local logs
  logs=$(podman logs "$NAME" 2>&1)
  grep -q "Application shutdown complete" <<<"$logs" || fail "no graceful shutdown in the logs"
  # The image has g++ (CPU_KERNELS=true): the C++ kernels must have built, not fallen back.
  if [[ ${EXPECT_KERNELS:-1} == 1 ]] && grep -q "kernel unavailable" <<<"$logs"; then
    fail "the C++ kernels fell back to the torch path"
  fi
  check_logs "$logs"
}

main() {
  install_tools
  make_base
  build_image
  log "image size: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
  [[ ${1:-} == --build-only ]] && exit 0
  run_and_check
  if [[ ${CLEAN:-0} == 1 ]]; then
    log "removing images"
    podman rmi -f "$IMAGE" "$CPU_BASE" localhost/debian:bookworm-python localhost/debian:bookworm-min >/dev/null || true
    podman image prune -f >/dev/null || true
  fi
  log "PASS: built, healthy, completed, stopped gracefully"
}

# docker/build-gpu-local.sh sources this file for its functions and runs its own main.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
