"""Golden parity fixtures from transformers, for tests/suite/parity_hf.rs.

Run by hand from the repository root (needs torch and transformers; the versions used are
written into every expected.json):

    python scripts/parity_fixtures.py [CASE ...]
    python scripts/parity_fixtures.py --trajectories [CASE ...]   # trajectory.json only

With case names, only those are written (the others keep the files they have).

For each case it builds a small random checkpoint with transformers, saves it with
`save_pretrained` (transformers 5's config.json: `rope_parameters`, `dtype`) into
tests/fixtures/parity/<case>/, and writes expected.json: the token ids, the per-token
log-probabilities of the next token, the mean causal-LM loss, and the gradient norm of every
parameter, all in float32 on the CPU. Case `*-v4` holds the same weights as the case it names,
with config.json rewritten the way transformers 4 writes it (top-level `rope_theta` and
`rope_scaling`, `torch_dtype`).

Weights are not transformers' initialisation (std 0.02 makes the logits nearly uniform, so a
wrong model could pass): matrices are N(0, 0.15²), norm weights 1 + N(0, 0.2²), biases
N(0, 0.1²), so every part of the model moves the outputs.
"""

import copy
import json
import os
import shutil

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

OUT = os.path.join("tests", "fixtures", "parity")
BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# name: (model_type, overrides)
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
        },
    ),
    "llama-linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "mistral": ("mistral", {"sliding_window": 4096, "head_dim": 16}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen2-yarn": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "phi3": ("phi3", {"pad_token_id": 0, "eos_token_id": 2}),
    # Small soft-caps, so that capping moves the outputs well beyond the tolerances.
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": 64,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
    ),
    # Multipliers far from 1, so that each one moves the outputs.
    "granite": (
        "granite",
        {
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 2.5,
        },
    ),
    "olmo2": ("olmo2", {}),
    # NoPE on every second layer: layer 1 has no RoPE.
    "smollm3": (
        "smollm3",
        {"no_rope_layer_interval": 2, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    ),
    # Sliding windows of 4 positions under sequences of 24 (6 windows): every layer for
    # Mistral and Phi-3, layer 0 of 2 for Gemma 2 and Gemma 3, layer 1 of 2 for Qwen2.
    "mistral-window": ("mistral", {"sliding_window": 4, "head_dim": 16}),
    "phi3-window": ("phi3", {"sliding_window": 4, "pad_token_id": 0, "eos_token_id": 2}),
    "gemma2-window": (
        "gemma2",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": 4,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
    ),
    "gemma3-window": (
        "gemma3_text",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
    ),
    "qwen2-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
}
# GPT-2 (for examples/gpt2.rs): Conv1D weights stored (in, out), learned positions, tied head.
GPT2 = dict(
    vocab_size=96,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=64,
    activation_function="gelu_new",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
# Also written in transformers 4's config format.
V4 = ["llama3-rope", "qwen2-yarn", "gemma3", "gemma2-window", "gemma3-window", "qwen2-window"]
IDS_SHAPE = (2, 24)


def scale_weights(model, seed, is_norm=lambda name: name.endswith("norm.weight")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if is_norm(name):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def expectations(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    next_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    return {
        "input_ids": ids.tolist(),
        "logprobs": next_logp.tolist(),
        "loss": out.loss.item(),
        "grad_norms": norms,
    }


def v4_config(config_json):
    c = copy.deepcopy(config_json)
    rope = c.pop("rope_parameters", None) or {}
    if "full_attention" in rope:  # Gemma 3: global RoPE at top level, local base apart
        sliding = rope.get("sliding_attention") or {}
        c["rope_local_base_freq"] = sliding.get("rope_theta", 10000.0)
        c["sliding_window_pattern"] = c["layer_types"].index("full_attention") + 1
        rope = rope["full_attention"]
    c["rope_theta"] = rope.pop("rope_theta", 10000.0)
    c["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    c.pop("layer_types", None)
    return c


# GPT-2's seed index: the case count before the Granite, OLMo 2 and SmolLM3 cases were added.
GPT2_INDEX = 12


def main(only):
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    os.makedirs(OUT, exist_ok=True)
    for i, (name, (model_type, overrides)) in enumerate(CASES.items()):
        if only and name not in only:
            continue
        torch.manual_seed(i)
        config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
        scale_weights(model, seed=100 + i)
        ids = torch.randint(0, BASE["vocab_size"], IDS_SHAPE, generator=torch.Generator().manual_seed(i))
        expected = expectations(model, ids)
        expected["versions"] = versions
        expected["model_type"] = model_type
        path = os.path.join(OUT, name)
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
        with open(os.path.join(path, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(f"{name}: loss {expected['loss']:.6f}")
        if name in V4:
            v4 = path + "-v4"
            shutil.rmtree(v4, ignore_errors=True)
            shutil.copytree(path, v4)
            with open(os.path.join(path, "config.json")) as f:
                config_json = json.load(f)
            with open(os.path.join(v4, "config.json"), "w") as f:
                json.dump(v4_config(config_json), f, indent=2)
            print(f"{name}-v4: same weights, transformers 4 config")
    if not only or "gpt2" in only:
        gpt2(GPT2_INDEX)


def gpt2(index):
    torch.manual_seed(index)
    config = AutoConfig.for_model("gpt2", **GPT2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    scale_weights(model, 100 + index, is_norm=lambda n: ".ln_" in n and n.endswith(".weight"))
    ids = torch.randint(0, GPT2["vocab_size"], IDS_SHAPE, generator=torch.Generator().manual_seed(index))
    expected = expectations(model, ids)
    expected["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    expected["model_type"] = "gpt2"
    path = os.path.join(OUT, "gpt2")
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(f"gpt2: loss {expected['loss']:.6f}")


# 4-step trajectories (tests/suite/parity_hf.rs, `trajectories_match_transformers`): the saved
# fixtures trained by torch.optim.AdamW, full and LISA, written to trajectory.json beside them;
# and every gradient tensor of the first step in grads.safetensors (`every_gradient_tensor_…`).
TRAJECTORY_CASES = ["granite", "olmo2", "smollm3", "mistral-window", "gemma2-window", "gemma3-window", "qwen2-window"]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# LISA with one block of two, redrawn every 2 steps in ascending order (candle-lisa's
# `ascending` sampler): block 0 for steps 0-1, block 1 for steps 2-3. The embedding, the head
# and every parameter outside the blocks always train; a block's AdamW state is dropped when
# it freezes (each parameter keeps its own step count, as in torch).
LISA_SCHEDULE = [0, 0, 1, 1]


def trajectory(path, ids, lisa):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float()
    model.train()
    blocks = model.model.layers
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for step in range(4):
        if lisa:
            for i, block in enumerate(blocks):
                for p in block.parameters():
                    on = i == LISA_SCHEDULE[step]
                    if not on:
                        opt.state.pop(p, None)
                        p.grad = None
                    p.requires_grad_(on)
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return losses


def trajectories(only):
    for name in TRAJECTORY_CASES:
        if only and name not in only:
            continue
        path = os.path.join(OUT, name)
        with open(os.path.join(path, "expected.json")) as f:
            ids = torch.tensor(json.load(f)["input_ids"])
        out = {
            "adamw": {k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()},
            "lisa_schedule": LISA_SCHEDULE,
            "full": trajectory(path, ids, lisa=False),
            "lisa": trajectory(path, ids, lisa=True),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        with open(os.path.join(path, "trajectory.json"), "w") as f:
            json.dump(out, f, indent=1)
        # Every gradient tensor of the first step's loss, for the tensor-by-tensor check.
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.contiguous() for n, p in model.named_parameters()}
        save_file(grads, os.path.join(path, "grads.safetensors"))
        print(f"{name}: full {out['full'][0]:.4f} -> {out['full'][-1]:.4f}, lisa -> {out['lisa'][-1]:.4f}")


if __name__ == "__main__":
    import sys

    args = set(sys.argv[1:])
    if "--trajectories" in args:
        trajectories(args - {"--trajectories"})
    else:
        main(args)
