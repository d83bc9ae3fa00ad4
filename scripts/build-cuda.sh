#!/usr/bin/env bash
# Builds or checks tsq with `--features cuda` on a machine without a GPU or a CUDA install:
#
#   scripts/build-cuda.sh check                                  # CI runs check and clippy
#   scripts/build-cuda.sh clippy --all-targets -- -D warnings
#   scripts/build-cuda.sh build --release                        # a binary to carry to a GPU
#
# It installs a CUDA 13.0 toolchain (nvcc, its front end and headers, the runtime) from the
# registry's wheels into a virtualenv under $TSQ_CUDA_HOME (default ~/.cache/tsq-cuda; once,
# ~400 MB), pinned to the 13.0 driver of the lent GPU machines (a newer nvcc writes PTX that driver
# refuses), and runs `cargo <command> --features cuda <args>` with it. candle's kernels are
# compiled for compute capability $CUDA_COMPUTE_CAP (default 90, the H100/H200: there is no GPU
# to ask). Without $CARGO_TARGET_DIR the build goes to $TSQ_CUDA_HOME/target, away from the
# CPU build's.
#
# candle links cuBLAS, cuRAND, NVRTC and libcuda dynamically: `build` links against the 13.0
# wheels of the first three and against a stub libcuda made here from the driver functions cudarc
# declares (the real one is the GPU machine's driver, as in CUDA's own lib/stubs). On the GPU
# machine the binary needs those libraries on LD_LIBRARY_PATH: scripts/gpu-check.sh takes them
# from the Python packages there. `run`, `test` and `bench` need a GPU and are refused.
set -euo pipefail
cd "$(dirname "$0")/.."

command="${1:-}"
case "$command" in
  check | clippy | build) shift ;;
  *)
    echo "usage: scripts/build-cuda.sh check|clippy|build [cargo arguments]" >&2
    echo "(run, test and bench need a GPU: carry a built binary to one, see scripts/gpu-check.sh)" >&2
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
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)
stamp="$home/installed-${#wheels[@]}-$(printf '%s ' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
  echo "scripts/build-cuda.sh: installing the CUDA 13.0 toolchain into $home/venv"
  # Debian's python3 makes a virtualenv with pip only with python3-venv installed.
  rm -rf "$home/venv"
  if ! python3 -m venv "$home/venv" >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv
    else
      echo "scripts/build-cuda.sh: python3 cannot make a virtualenv: install python3-venv" >&2
      exit 1
    fi
    rm -rf "$home/venv" && python3 -m venv "$home/venv"
  fi
  "$home/venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
  touch "$stamp"
fi

# cudarc's build script searches $CUDA_HOME/lib for -lcuda, -lcublas, ...: the wheels ship only
# versioned names (libcublas.so.13), and no libcuda at all, so lib/ gets unversioned links and a
# stub libcuda.so (never loaded: the binary asks for libcuda.so.1, the driver's).
link_stubs() {
  local cuda="$1" lib
  for lib in cublas cublasLt curand nvrtc cudart; do
    ln -sf "$(basename "$(ls "$cuda"/lib/lib$lib.so.[0-9]* | head -1)")" "$cuda/lib/lib$lib.so"
  done
  # Made afresh each time (a second): the lockfile may have moved cudarc to another version.
  cargo fetch --locked -q
  local cudarc
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(cudarc_version)" | head -1)"
  grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | sort -u |
    sed 's/^pub unsafe fn \(.*\)/void \1(void) {}/' >"$home/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/libcuda.so" "$home/libcuda-stub.c"
}

cudarc_version() {
  grep -A1 '^name = "cudarc"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p'
}

cuda="$(echo "$home"/venv/lib/python3*/site-packages/nvidia/cu13)"
[[ -x "$cuda/bin/nvcc" ]] || { echo "scripts/build-cuda.sh: no nvcc in $cuda" >&2; exit 1; }
link_stubs "$cuda"
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$home/target}"
exec cargo "$command" --features cuda "$@"
