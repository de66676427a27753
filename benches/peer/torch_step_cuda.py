#!/usr/bin/env python3
"""The PyTorch peer of the GPU check's profile: one training step of full fine-tuning, LoRA-16
and LISA (gamma = 2) on a CUDA device, at the profile's shapes, bf16, B = 1.

    python3 benches/peer/torch_step_cuda.py            # on the GPU machine (scripts/gpu-check.sh peer)

Needs torch with CUDA, transformers and peft (the H200 machines' image has them). The model is
transformers' LlamaForCausalLM with random weights in bf16 and its default attention (SDPA,
flash kernels on the H200), trained with torch.optim.AdamW (fused, moments in the parameters'
bf16: lighter than candle-lisa's f32 master copy and moments); the methods as in
torch_step.py (LISA redraws 2 blocks every 2 steps and rebuilds AdamW over what trains). Random
token ids; `--steps` steps after 2 warm-up steps, each timed with a synchronisation; prints
one JSON line per configuration with the median step time and the peak of
torch.cuda.max_memory_allocated.
"""

import argparse
import json
import random
import time

SHAPES = {
    # vocab, hidden, layers, heads, kv heads, intermediate, tied, rope theta, T
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536, True, 100000.0, 256),
    "llama3.2-1b": (128256, 2048, 16, 32, 8, 8192, True, 500000.0, 2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(shape, method, steps):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, hidden, layers, heads, kv, inter, tied, theta, t = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
        tie_word_embeddings=tied, rope_theta=theta, max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model.train()
    rng = random.Random(0)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)

    if method == "lora16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
        )
    blocks = model.model.layers if method != "lora16" else model.base_model.model.model.layers

    def draw():
        for p in model.parameters():
            p.requires_grad_(False)
        for m in (model.model.embed_tokens, model.lm_head, model.model.norm):
            for p in m.parameters():
                p.requires_grad_(True)
        for i in rng.sample(range(layers), 2):
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        return adamw([p for p in model.parameters() if p.requires_grad])

    opt = draw() if method == "lisa2" else adamw([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, vocab, (1, t), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if method == "lisa2" and (step + 1) % 2 == 0:
            del opt
            opt = draw()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    timed = sorted(times[2:])
    line = {
        "check": "peer", "name": f"torch {shape} {method} bf16 T={t}", "shape": shape,
        "method": method, "seq_len": t, "step_ms": timed[len(timed) // 2], "step_ms_all": times,
        "peak_bytes": torch.cuda.max_memory_allocated(), "torch": torch.__version__,
        "attention": model.config._attn_implementation,
    }
    del model, opt
    torch.cuda.empty_cache()
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama3.2-1b")
    ap.add_argument("--methods", default="full,lisa2,lora16")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            print(json.dumps(one(shape, method, args.steps)), flush=True)


if __name__ == "__main__":
    main()
