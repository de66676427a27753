#!/usr/bin/env bash
# One device session of the GPU issue's before/after (run from the repository root on the GPU
# machine; nothing is compiled there): the GPU check, the profile under CUPTI, an older
# commit's memory report at the profile's shapes (also under CUPTI) and the PyTorch peer
# (benches/peer/torch_step_cuda.py). Everything goes into $OUT.
#
#   scripts/gpu-check.sh build                       # here, at the commit under test
#   mkdir -p target/gpu-carry/after target/gpu-carry/before
#   cp target/gpu-check/*.xz target/gpu-check/libcupti_counts.so target/gpu-carry/after/
#   # ... and the memory_report.xz of the older commit's `build` into target/gpu-carry/before/
#   scripts/gpu-session.sh                           # there; carry target/gpu-carry
#
# The numbers of 2026-12-04 in docs/performance.md came from this script (the older commit:
# e0b8179). The device returns at most 8 files a call: pack $OUT before it comes back.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
libs=(libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)
names=(); for lib in "${libs[@]}"; do names+=(-o -name "$lib"); done
all=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \( -false "${names[@]}" \) -print 2>/dev/null | grep -v /stubs/ || true)
dirs=""; for lib in "${libs[@]}"; do f=$(printf '%s\n' "$all" | grep "/$lib\$" | head -n 1); dirs="$dirs:$(dirname "$f")"; done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "$LD_LIBRARY_PATH" > "$OUT/ld_library_path.txt"
unxz() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; chmod +x "$2"; }
for f in target/gpu-carry/after/*.xz target/gpu-carry/before/*.xz; do unxz "$f" "${f%.xz}"; done
A=target/gpu-carry/after B=target/gpu-carry/before
t0=$(date +%s)
# 1. The whole check with the new binary (ops incl. the new kernels, update, bandwidth,
#    finetune, profile, memory).
timeout 200 $A/gpu_check --finetune-steps 150 > "$OUT/gpu_check.jsonl" 2> "$OUT/gpu_check.err"; echo "gpu_check rc=$? $(( $(date +%s) - t0 ))s" >> "$OUT/times.txt"
# 2. The profile under CUPTI: driver calls, launches, kernel time per step.
CUDA_INJECTION64_PATH=$PWD/$A/libcupti_counts.so timeout 90 $A/gpu_check --skip op,update,bandwidth,finetune,memory --profile-steps 3 > "$OUT/counts.jsonl" 2> "$OUT/counts.err"; echo "counts rc=$? $(( $(date +%s) - t0 ))s" >> "$OUT/times.txt"
# 3. Before: the previous commit's memory report at the profile's shapes (step_ms_median),
#    interleaved with the new one's.
for bin in $B $A; do
  tag=$(basename $bin)
  timeout 60 $bin/memory_report --device cuda --json --shape smollm2-135m --dtype bf16 --methods full,lisa2,lora16,lisa2-recompute --steps 6 > "$OUT/report_${tag}_smol_bf16.jsonl" 2>> "$OUT/report.err"
  timeout 60 $bin/memory_report --device cuda --json --shape smollm2-135m --dtype f32 --methods full,lisa2,lora16 --steps 6 > "$OUT/report_${tag}_smol_f32.jsonl" 2>> "$OUT/report.err"
  timeout 90 $bin/memory_report --device cuda --json --shape llama3.2-1b --dtype bf16 --seq-len 2048 --methods full,lisa2,lora16,lisa2-recompute --steps 6 > "$OUT/report_${tag}_1b.jsonl" 2>> "$OUT/report.err"
  echo "report $tag $(( $(date +%s) - t0 ))s" >> "$OUT/times.txt"
done
# 4. Before under CUPTI (whole process, lisa2 on the 1B shape, 3 and 8 steps: the difference
#    is five steps' calls).
for n in 3 8; do
  LISA_CUPTI_WHOLE="before 1b lisa2 steps=$n" CUDA_INJECTION64_PATH=$PWD/$A/libcupti_counts.so timeout 60 $B/memory_report --child --device cuda --shape llama3.2-1b --dtype bf16 --seq-len 2048 --methods lisa2 --steps $n > "$OUT/before_counts_$n.jsonl" 2>> "$OUT/report.err"
done
echo "before counts $(( $(date +%s) - t0 ))s" >> "$OUT/times.txt"
# 5. The PyTorch peer.
timeout 100 python3 benches/peer/torch_step_cuda.py > "$OUT/peer.jsonl" 2> "$OUT/peer.err"; echo "peer rc=$? $(( $(date +%s) - t0 ))s" >> "$OUT/times.txt"
tail -3 "$OUT/gpu_check.jsonl"; cat "$OUT/times.txt"
(cd "$OUT" && tar czf session.tgz --remove-files report* peer.* times.txt ld_library_path.txt 2>/dev/null)
