#!/usr/bin/env python3
"""The PyTorch peer of the memory report: one training step of full fine-tuning, LoRA-16 and
LISA (gamma = 2) timed side by side with candle-lisa, each configuration in a fresh process.

    cargo build --release --example memory_report
    python benches/peer/torch_step.py > docs/peer_step.md

Needs torch, transformers and peft (tested with torch 2.15.0, transformers 5.24.0, peft
0.21.2). For every shape and method it runs, in turn, a PyTorch process (this script with
--child) and candle-lisa's (`memory_report --child`), both with the same thread count,
B = 1, T = 256, random token ids, `--steps` steps of which the first is not timed, and reads
each process's peak RSS from wait4(2). With `--rounds N` it goes through every configuration N
times, in turn, and takes the median over the rounds of each process's median step time (on a
shared machine speed drifts over minutes; interleaving spreads the drift over both sides). It
prints a Markdown table and, with --json, one line per process.

The PyTorch side is transformers' LlamaForCausalLM in f32 with torch.optim.AdamW:
- full: every parameter;
- lora16: peft LoRA r = 16, alpha = 32 on the seven projections;
- lisa2: everything frozen but the embedding, the head, the final norm and 2 blocks drawn at
  random, redrawn every 2 steps with AdamW rebuilt over what trains (as LMFlow's LISA
  callback does), so the optimizer state follows the active blocks.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

SHAPES = {
    # vocab, hidden, layers, heads, kv heads, intermediate, tied, rope theta
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536, True, 100000.0),
    "llama2-7b-scaled": (4000, 512, 32, 8, 8, 1376, False, 10000.0),
    "tiny": (258, 128, 8, 4, 2, 352, True, 10000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, hidden, layers, heads, kv, inter, tied, theta = SHAPES[args.shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        tie_word_embeddings=tied,
        rope_theta=theta,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    model.train()
    rng = random.Random(0)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    if args.method == "lora16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
        )
    blocks = model.model.layers if args.method != "lora16" else model.base_model.model.model.layers

    def draw():
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.model.embed_tokens.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        for p in model.model.norm.parameters():
            p.requires_grad_(True)
        for i in rng.sample(range(layers), 2):
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        return adamw([p for p in model.parameters() if p.requires_grad])

    if args.method == "lisa2":
        opt = draw()
    else:
        opt = adamw([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, vocab, (1, args.seq_len))
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.method == "lisa2" and (step + 1) % 2 == 0:
            del opt
            opt = draw()
        times.append(1000 * (time.perf_counter() - start))
    timed = sorted(times[1:])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "shape": args.shape, "method": args.method, "step_ms": times,
        "step_ms_median": timed[len(timed) // 2], "trainable_params": trainable,
        "torch": torch.__version__,
    }))


def run(cmd, env):
    """Runs cmd, returns (its JSON line, its peak RSS in bytes)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    line = [l for l in out.decode().splitlines() if l.startswith("{")][-1]
    return json.loads(line), usage.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama2-7b-scaled")
    ap.add_argument("--methods", default="full,lora16,lisa2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="passes over every configuration")
    ap.add_argument("--ours", default="target/release/examples/memory_report")
    ap.add_argument("--json", help="write one JSON line per process here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    runs = {}  # (shape, method) -> [(torch json, torch rss, ours json, ours rss)] per round
    for rnd in range(args.rounds):
        for shape in args.shapes.split(","):
            for method in args.methods.split(","):
                common = ["--steps", str(args.steps), "--seq-len", str(args.seq_len)]
                torch_cmd = [sys.executable, __file__, "--child", "--shape", shape, "--method",
                             method, "--threads", str(args.threads)] + common
                ours_cmd = [args.ours, "--child", "--shape", shape, "--methods", method,
                            "--batch-size", "1"] + common
                t, t_rss = run(torch_cmd, env)
                o, o_rss = run(ours_cmd, env)
                runs.setdefault((shape, method), []).append((t, t_rss, o, o_rss))
                print(f"round {rnd + 1}: {shape} {method}: torch {t['step_ms_median']:.0f} ms, "
                      f"ours {o['step_ms_median']:.0f} ms", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            for (shape, method), rounds in runs.items():
                for rnd, (t, t_rss, o, o_rss) in enumerate(rounds):
                    f.write(json.dumps({"side": "pytorch", "round": rnd, **t, "peak_rss": t_rss}) + "\n")
                    f.write(json.dumps({"side": "candle-lisa", "round": rnd, **o, "peak_rss": o_rss})
                            + "\n")

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    rows = []
    for (shape, method), rounds in runs.items():
        t_ms = median([r[0]["step_ms_median"] for r in rounds])
        o_ms = median([r[2]["step_ms_median"] for r in rounds])
        rows.append((shape, method, t_ms, max(r[1] for r in rounds), o_ms, max(r[3] for r in rounds)))
    print(f"B = 1, T = {args.seq_len}, f32, {args.threads} threads, {args.steps} steps per process "
          f"(median of all but the first), median over {args.rounds} interleaved rounds; peak RSS "
          "of the whole process (the largest over the rounds)")
    print()
    print("| shape | method | PyTorch step ms | candle-lisa step ms | ratio | PyTorch peak RSS MB "
          "| candle-lisa peak RSS MB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, method, t, t_rss, o, o_rss in rows:
        print(f"| {shape} | {method} | {t:.0f} | {o:.0f} | {o / t:.2f}× | {t_rss / 1e6:.0f} | "
              f"{o_rss / 1e6:.0f} | {o_rss / t_rss:.2f}× |")


if __name__ == "__main__":
    main()
