#!/usr/bin/env bash
# Build the GPU image (`docker run --gpus all`) with podman on a machine with no image registry, and
# check it on this GPU-less machine: it must start, log that it fell back to CPU, serve a completion
# and stop gracefully. The Dockerfile's default base (nvidia/cuda ...-base) cannot be pulled here;
# PyPI's CUDA build of torch bundles the CUDA runtime (the nvidia-* wheels), so the debootstrapped
# Debian base of build-cpu-local.sh plus that wheel is the same image: the host's NVIDIA container
# toolkit mounts the driver (libcuda) at run time, as with the CUDA base. Needs root.
#
#   bash docker/build-gpu-local.sh              # build + run + check (on CPU)
#   bash docker/build-gpu-local.sh --build-only
#
# Env: as build-cpu-local.sh; IMAGE defaults to localhost/smollm2-server:gpu, TORCH_SPEC to
#      torch==2.13.0 (from PyPI: several GB with its CUDA libraries; check `df -h /var/lib/containers`).
set -euo pipefail

IMAGE=${IMAGE:-localhost/smollm2-server:gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# shellcheck source=docker/build-cpu-local.sh
source "$(dirname "$0")/build-cpu-local.sh"
# A GPU image has no compiler (CPU_KERNELS=false): on CPU it runs the plain torch path, by design.
EXPECT_KERNELS=0

build_image() {
  log "building $IMAGE (torch: $TORCH_SPEC from PyPI, with its bundled CUDA libraries)"
  # --layers=false: one commit per stage, not per step. With the vfs driver every committed layer is a
  # full copy of the file system, and with ~5.5 GB of torch and CUDA libraries per step the per-step
  # layers filled 70 GB of disk before the last stage.
  podman build --pull=never --layers=false --format docker -t "$IMAGE" \
    -v "$CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt \
    --build-arg BASE_IMAGE="$CPU_BASE" --build-arg CPU_KERNELS=false \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-arg TORCH_SPEC="$TORCH_SPEC" \
    "$REPO"
  podman image prune -f >/dev/null  # the builder stage's image
}

# The line names torch's CUDA version, so it also shows that the image holds a CUDA build of torch.
check_logs() {
  grep -q "CUDA .*falling back to CPU" <<<"$1" || fail "no 'CUDA ...: falling back to CPU' line in the log"
  log "log says: $(grep -m1 "falling back to CPU" <<<"$1")"
}

main "$@"
