#!/usr/bin/env bash
# Checks tsq with `--features cuda` on a machine without a GPU or a CUDA install, so the GPU code
# keeps compiling (CI runs it):
#
#   scripts/build-cuda.sh check
#   scripts/build-cuda.sh clippy --all-targets -- -D warnings
#
# It installs a CUDA 13.0 toolchain (nvcc, its front end and headers, the runtime) from the
# registry's wheels into a virtualenv under $TSQ_CUDA_HOME (default ~/.cache/tsq-cuda; once,
# ~400 MB), pinned to the 13.0 driver of the lent GPU machines (a newer nvcc writes PTX that driver
# refuses), and runs `cargo <command> --features cuda <args>` with it. candle's kernels are
# compiled for compute capability $CUDA_COMPUTE_CAP (default 90, the H100/H200: there is no GPU
# to ask). Without $CARGO_TARGET_DIR the build goes to $TSQ_CUDA_HOME/target, away from the
# CPU build's.
#
# Linking a CUDA binary (`build`) also needs cuBLAS, cuRAND, NVRTC and a link-time libcuda; that
# is not set up yet (issue 21), so `build`, `run`, `test` and `bench` are refused.
set -euo pipefail
cd "$(dirname "$0")/.."

command="${1:-}"
case "$command" in
  check | clippy) shift ;;
  *)
    echo "usage: scripts/build-cuda.sh check|clippy [cargo arguments]" >&2
    echo "(linking a CUDA build, for build/run/test/bench, is not set up yet: issue 21)" >&2
    exit 2
    ;;
esac

home="${TSQ_CUDA_HOME:-$HOME/.cache/tsq-cuda}"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
stamp="$home/installed-${#wheels[@]}-$(printf '%s ' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
  echo "scripts/build-cuda.sh: installing the CUDA 13.0 toolchain into $home/venv"
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv
    else
      echo "scripts/build-cuda.sh: python3's venv module is needed (Debian: python3-venv)" >&2
      exit 1
    fi
  fi
  rm -rf "$home/venv"
  python3 -m venv "$home/venv"
  "$home/venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
  touch "$stamp"
fi

cuda="$(echo "$home"/venv/lib/python3*/site-packages/nvidia/cu13)"
[[ -x "$cuda/bin/nvcc" ]] || { echo "scripts/build-cuda.sh: no nvcc in $cuda" >&2; exit 1; }
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$home/target}"
exec cargo "$command" --features cuda "$@"
