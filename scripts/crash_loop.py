#!/usr/bin/env python3
"""Crash loop: SIGKILLs `finetune` at random times, resumes it until it completes, and compares
its final model, its last checkpoint and its metrics with an uninterrupted run, bit for bit.

    cargo build --release --example finetune
    python3 scripts/crash_loop.py --seeds 0-9 [--configs lisa-k1,lora-k3,...] [--jobs 2]

For each configuration (method, --keep, and whether one step's loss is made NaN so that it is
skipped) it runs the command once uninterrupted, then, for each seed, runs it again with kills:
each attempt is killed after a delay drawn by a seeded RNG (uniform over the uninterrupted
run's wall time, so kills land in start-up, resume, training, evaluation, checkpoint and model
saves alike); a third of the attempts also pass `--kill-after-writes K` (K drawn), which kills
the process right after the K-th checkpoint file is flushed, in the middle of a save. Every
attempt after the first passes `--resume`. A run completes when an attempt exits with status 0.

Compared with the uninterrupted run: every tensor of the saved model (`<method>/model/*.
safetensors`, raw bytes), every tensor and JSON file of the newest checkpoint (weights,
optimizer state, trainer counters), every metrics.jsonl line (wall-clock `elapsed_s`
ignored) and the deterministic summary fields. Standard library only (Python 3.11).
"""

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples", "finetune")
BASE = ["--steps", "40", "--save-every", "3", "--eval-every", "20", "--eval-size", "20",
        "--batch-size", "4", "--period", "5"]
# name: (method, keep, extra arguments)
CONFIGS = {
    "lisa-k1": ("lisa", 1, []),
    "lisa-k3": ("lisa", 3, []),
    "lora-k1": ("lora", 1, []),
    "lora-k3": ("lora", 3, []),
    "full-k1": ("full", 1, []),
    "full-k3": ("full", 3, []),
    "lisa-k3-skip": ("lisa", 3, ["--poison-step", "7"]),
    "lora-k1-skip": ("lora", 1, ["--poison-step", "10"]),
}
WALL = {"elapsed_s"}
SUMMARY = ["steps", "final_train_loss", "eval_loss", "accuracy", "trainable_params",
           "state_bytes", "skipped_steps"]


def command(name, out):
    method, keep, extra = CONFIGS[name]
    return [BIN, "--method", method, "--keep", str(keep), "--out", out] + BASE + extra


def env():
    e = dict(os.environ)
    # One thread per process: runs in parallel do not compete, and the kernels' split is fixed.
    e["RAYON_NUM_THREADS"] = "1"
    return e


def safetensors(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), body[a:b])
    return out


def newest_checkpoint(out, method):
    root = os.path.join(out, method, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    return os.path.join(root, steps[-1])


def fingerprint(out, method):
    """Everything compared, as a dict of comparable values."""
    fp = {}
    model = os.path.join(out, method, "model")
    for f in sorted(os.listdir(model)):
        if f.endswith(".safetensors"):
            fp[f"model/{f}"] = safetensors(os.path.join(model, f))
    ck = newest_checkpoint(out, method)
    fp["checkpoint"] = os.path.basename(ck)
    for dirpath, _, files in os.walk(ck):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ck)
            if f.endswith(".safetensors"):
                fp[f"checkpoint/{rel}"] = safetensors(path)
            elif f.endswith(".json") and f != "manifest.json":
                with open(path) as fh:
                    fp[f"checkpoint/{rel}"] = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    fp["metrics"] = [{k: v for k, v in r.items() if k not in WALL} for r in lines]
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)[0]
    fp["summary"] = {k: summary.get(k) for k in SUMMARY}
    return fp


def differences(a, b):
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)]


def reference(name, work):
    out = os.path.join(work, name, "reference")
    started = time.monotonic()
    r = subprocess.run(command(name, out), env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}: the uninterrupted run failed:\n{r.stderr}")
    return out, time.monotonic() - started


def crashed_run(name, seed, work, wall, ref_fp, max_attempts):
    """One crash-loop run; returns its counts and the differences from the reference."""
    rng = random.Random(f"{name}:{seed}")
    out = os.path.join(work, name, f"seed-{seed}")
    kills = in_save = resumes = failed = attempts = 0
    failure = None
    while attempts < max_attempts:
        cmd = command(name, out)
        if attempts > 0:
            cmd.append("--resume")
            resumes += 1
        attempts += 1
        delay = rng.uniform(0.0, wall * 1.1)
        if rng.random() < 1 / 3:
            cmd += ["--kill-after-writes", str(rng.randint(1, 40))]
        p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        timed_out = False
        try:
            _, err = p.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            _, err = p.communicate()
            timed_out = True
        code = p.returncode
        if code == -signal.SIGKILL:
            kills += 1
            # Not by the timer: by --kill-after-writes, in the middle of a checkpoint save.
            in_save += not timed_out
            continue
        if code != 0:
            failed += 1
            failure = f"attempt {attempts} exited with {code}: {err.decode(errors='replace')[-2000:]}"
            break
        break
    else:
        failure = f"not complete after {max_attempts} attempts"
    diff = None
    if failure is None:
        got = fingerprint(out, CONFIGS[name][0])
        diff = differences(ref_fp, got)
        if diff:
            # What differs, briefly (tensors are bytes: named, not shown).
            failure = "; ".join(
                f"{k}: {ref_fp.get(k)} != {got.get(k)}" for k in diff
                if k in ("summary", "checkpoint")) or None
        else:
            shutil.rmtree(out, ignore_errors=True)
    return {"config": name, "seed": seed, "kills": kills, "in_save": in_save, "resumes": resumes,
            "failed_resumes": failed, "failure": failure, "differs": diff}


def seeds(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-4", help="e.g. 0-9 or 1,5,7")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=",".join(CONFIGS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--max-attempts", type=int, default=300)
    ap.add_argument("--work", help="working directory (default: a fresh temporary one)")
    ap.add_argument("--json", help="write every run's result here")
    args = ap.parse_args()
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN} is missing: cargo build --release --example finetune")
    names = args.configs.split(",")
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown configuration {n}: one of {', '.join(CONFIGS)}")
    work = args.work or tempfile.mkdtemp(prefix="crash-loop-")
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        refs = dict(zip(names, pool.map(lambda n: reference(n, work), names)))
        fps = {n: fingerprint(refs[n][0], CONFIGS[n][0]) for n in names}
        jobs = [(n, s) for n in names for s in seeds(args.seeds)]
        results = list(pool.map(
            lambda j: crashed_run(j[0], j[1], work, refs[j[0]][1], fps[j[0]], args.max_attempts),
            jobs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{'config':14} {'runs':>4} {'kills':>6} {'in save':>7} {'resumes':>7} {'failed':>6}"
          f" {'differ':>6} {'identical':>9}  (reference s)")
    total = {"runs": 0, "kills": 0, "in_save": 0, "resumes": 0, "failed": 0, "differ": 0,
             "same": 0}
    for n in names:
        rs = [r for r in results if r["config"] == n]
        row = {
            "runs": len(rs),
            "kills": sum(r["kills"] for r in rs),
            "in_save": sum(r["in_save"] for r in rs),
            "resumes": sum(r["resumes"] for r in rs),
            "failed": sum(r["failed_resumes"] for r in rs),
            "differ": sum(1 for r in rs if r["differs"]),
            "same": sum(1 for r in rs if r["differs"] == []),
        }
        for k in total:
            total[k] += row[k]
        print(f"{n:14} {row['runs']:>4} {row['kills']:>6} {row['in_save']:>7}"
              f" {row['resumes']:>7} {row['failed']:>6} {row['differ']:>6} {row['same']:>9}"
              f"  ({refs[n][1]:.1f})")
    print(f"{'total':14} {total['runs']:>4} {total['kills']:>6} {total['in_save']:>7}"
          f" {total['resumes']:>7} {total['failed']:>6} {total['differ']:>6} {total['same']:>9}")
    print(f"{time.monotonic() - started:.0f} s")
    bad = [r for r in results if r["failure"] or r["differs"]]
    for r in bad:
        print(f"FAIL {r['config']} seed {r['seed']}: {r['differs']} {r['failure'] or ''}",
              file=sys.stderr)
    if not args.work and not bad:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
