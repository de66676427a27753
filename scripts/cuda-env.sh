# Source this file to build candle-lisa with `--features cuda` on a machine without a GPU or a
# CUDA install (shared/DESIGN.md fact 8): it installs the CUDA 13.0 compiler from PyPI into a
# virtual environment kept under ~/.cache, and exports what candle's and this crate's build
# scripts read.
#
#   source scripts/cuda-env.sh          # enough for `cargo check --features cuda`
#   source scripts/cuda-env.sh --link   # also the CUDA libraries, to link binaries
#
# CUDA 13.0 because PTX from a newer nvcc does not load on a driver of the 13.0 series (the
# H200 machines run driver 580); every wheel is pinned, since nvcc's own dependencies (nvvm,
# crt) otherwise resolve to the newest release. Linking needs libcuda, which only a driver
# install has: a stub with the driver API's names and the driver's soname stands in for it,
# and the real one is found at run time. At run time the binary needs libcudart.so.13,
# libcublas(Lt).so.13, libcurand.so.10 and libnvrtc.so.13 on LD_LIBRARY_PATH (PyTorch's
# CUDA wheels carry them).
cuda_cache="${XDG_CACHE_HOME:-$HOME/.cache}/candle-lisa"
cuda_venv="$cuda_cache/cuda-venv-13.0"
cuda_wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96)
if [ "${1:-}" = "--link" ]; then
    cuda_wheels+=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
fi
if ! [ -x "$cuda_venv/bin/pip" ]; then
    if ! python3 -m venv "$cuda_venv"; then
        apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$cuda_venv"
    fi
fi
# Installed once per wheel list (no network needed afterwards).
cuda_stamp="$cuda_venv/.candle-lisa-wheels"
if [ "$(cat "$cuda_stamp" 2>/dev/null)" != "${cuda_wheels[*]}" ]; then
    "$cuda_venv/bin/pip" install --quiet --disable-pip-version-check "${cuda_wheels[@]}"
    echo "${cuda_wheels[*]}" >"$cuda_stamp"
fi
cuda_root=$(ls -d "$cuda_venv"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
export PATH="$cuda_root/bin:$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
if [ "${1:-}" = "--link" ]; then
    cuda_link="$cuda_cache/cuda-link-13.0"
    mkdir -p "$cuda_link"
    for lib in "$cuda_root"/lib/lib{cudart,cublas,cublasLt,curand,nvrtc}.so.*; do
        case "$lib" in *alt*|*builtins*) continue ;; esac
        base=$(basename "$lib")
        ln -sf "$lib" "$cuda_link/${base%%.so.*}.so"
    done
    if ! [ -f "$cuda_link/libcuda.so" ]; then
        sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -n 1)
        grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u |
            sed 's/.*/void &(void) {}/' >"$cuda_link/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda_link/libcuda.so" "$cuda_link/libcuda_stub.c"
    fi
    export LIBRARY_PATH="$cuda_link${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
