#!/usr/bin/env python3
"""Compares two finetune runs step by step: the relative difference of their training losses
(largest and mean) and of their held-out losses (largest), from each run's metrics.jsonl.

    python3 scripts/compare_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl [--method lisa]

The figures in docs/design.md and docs/custom-models.md for two ranks against one process and for compact against f32 moments
come from this.
"""

import argparse
import json


def rows(path, method):
    with open(path) as f:
        out = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in out if method is None or r["method"] == method}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--method", help="only this method's lines (lisa, lora, full)")
    args = ap.parse_args()
    a, b = rows(args.reference, args.method), rows(args.other, args.method)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("the two runs share no step")
    rel = [abs(b[s]["loss"] - a[s]["loss"]) / abs(a[s]["loss"]) for s in steps]
    evals = [s for s in steps if "eval_loss" in a[s] and "eval_loss" in b[s]]
    eval_rel = [abs(b[s]["eval_loss"] - a[s]["eval_loss"]) / abs(a[s]["eval_loss"]) for s in evals]
    print(f"{len(steps)} steps: training loss max relative difference {max(rel):.3g}, "
          f"mean {sum(rel) / len(rel):.3g}")
    if eval_rel:
        last = evals[-1]
        print(f"{len(evals)} evaluations: held-out loss max relative difference "
              f"{max(eval_rel):.3g} (step {last}: {a[last]['eval_loss']:.4f} against "
              f"{b[last]['eval_loss']:.4f})")


if __name__ == "__main__":
    main()
