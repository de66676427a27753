#!/usr/bin/env bash
# The GPU check (examples/gpu_check.rs), built here and run on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh build       # on any x86-64 Linux machine, no GPU needed: builds the
#                                    # stripped release binaries into target/gpu-check/, and
#                                    # xz-compressed copies (6.5 MB each instead of 57) to carry
#   scripts/gpu-check.sh run [ARGS]  # on the GPU machine, from the repository root (needs the
#                                    # driver and CUDA 13 runtime libraries, e.g. PyTorch's
#                                    # CUDA 13 wheels; nothing is compiled there)
#   scripts/gpu-check.sh report ARGS # the same, for `memory_report --device cuda ARGS`
#   scripts/gpu-check.sh counts      # the profile alone, under the CUPTI library
#                                    # (scripts/cupti_counts.c): driver calls, kernel launches
#                                    # and device time per kernel, per step
#
# `run` prints one JSON line per check (see examples/gpu_check.rs) and exits 1 if one failed.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    source scripts/cuda-env.sh --link
    target="${CARGO_TARGET_DIR:-target}"
    CARGO_TARGET_DIR="$target" cargo build --release --locked --features cuda \
        --example gpu_check --example memory_report
    mkdir -p target/gpu-check
    for bin in gpu_check memory_report; do
        cp "$target/release/examples/$bin" target/gpu-check/
        strip target/gpu-check/$bin
        xz -T0 -6 -kf target/gpu-check/$bin
    done
    # The CUPTI library that counts driver calls and kernel time for the profile (`counts`),
    # with the CUPTI runtime it links (the GPU machine may not have one).
    cupti_venv="${XDG_CACHE_HOME:-$HOME/.cache}/candle-lisa/cupti-13.0"
    if ! [ -f "$cupti_venv/nvidia/cu13/lib/libcupti.so.13" ]; then
        "$cuda_venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
            --target "$cupti_venv" nvidia-cuda-cupti==13.0.85
    fi
    cupti="$cupti_venv/nvidia/cu13"
    cc -shared -fPIC -O2 -Wall -Wextra -I "$cupti/include" -I "$CUDA_ROOT/include" \
        scripts/cupti_counts.c -o target/gpu-check/libcupti_counts.so \
        -L "$cupti/lib" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN'
    cp "$cupti/lib/libcupti.so.13" target/gpu-check/
    xz -T0 -6 -kf target/gpu-check/libcupti.so.13
    rm target/gpu-check/libcupti.so.13
    ls -l target/gpu-check
    ;;
run | report | counts)
    mode=$1
    shift
    # The CUDA libraries the binary links, wherever the driver, a CUDA install or a Python
    # wheel put them (one pass over the file system; stub libraries skipped).
    libs=(libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10
        libnvrtc.so.13)
    names=()
    for lib in "${libs[@]}"; do names+=(-o -name "$lib"); done
    all=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \( -false "${names[@]}" \) \
        -print 2>/dev/null | grep -v /stubs/ || true)
    dirs=""
    for lib in "${libs[@]}"; do
        found=$(printf '%s\n' "$all" | grep "/$lib\$" | head -n 1 || true)
        if [ -z "$found" ]; then
            echo "gpu-check: $lib not found; install the NVIDIA driver and the CUDA 13 runtime libraries" >&2
            exit 2
        fi
        dirs="$dirs:$(dirname "$found")"
    done
    export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Only the compressed binaries may have been carried here.
    for bin in gpu_check memory_report libcupti.so.13; do
        packed=target/gpu-check/$bin.xz
        if ! [ -x target/gpu-check/$bin ] && [ -f $packed ]; then
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                $packed target/gpu-check/$bin
            chmod +x target/gpu-check/$bin
        fi
    done
    if [ "$mode" = report ]; then
        exec target/gpu-check/memory_report --device cuda "$@"
    fi
    if [ "$mode" = counts ]; then
        export CUDA_INJECTION64_PATH="$PWD/target/gpu-check/libcupti_counts.so"
        exec target/gpu-check/gpu_check --skip op,update,bandwidth,finetune,memory "$@"
    fi
    exec target/gpu-check/gpu_check "$@"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build | run [ARGS] | report [ARGS] | counts [ARGS]" >&2
    exit 2
    ;;
esac
