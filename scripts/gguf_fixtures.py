#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/: a tiny Llama checkpoint as llama.cpp stores it (tiny.gguf) and
the same weights as a Hugging Face directory (hf/config.json, hf/model.safetensors), for the
GGUF loader's parity test (tests/suite/gguf.rs).

    python3 -m venv /tmp/gguf && /tmp/gguf/bin/pip install gguf==0.19.0 numpy safetensors
    /tmp/gguf/bin/python scripts/gguf_fixtures.py

The GGUF file is written by gguf-py (llama.cpp's own writer) with every tensor type the loader
reads: F32, F16, BF16, Q8_0, Q4_0 and Q4_1 quantized by gguf-py from random weights, Q4_K and
Q6_K as random blocks (gguf-py cannot quantize to them; any block with a finite scale is a
valid one). q and k are stored permuted as llama.cpp's converter permutes them
(convert_hf_to_gguf.py, LlamaModel.permute); quantization runs along rows, so permuting the
quantized rows equals quantizing the permuted weights. The safetensors file holds what each
stored tensor means in Hugging Face's layout: gguf-py's dequantization of the unpermuted
blocks, in f32.
"""

import json
import os

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter, quants
from safetensors.numpy import save_file

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 256, 2, 4, 1, 256, 64
THETA, EPS, CONTEXT = 500000.0, 1e-5, 512
HEAD_DIM = HIDDEN // HEADS
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")

# (GGUF name, Hugging Face name, rows, columns, stored type)
TENSORS = [("token_embd.weight", "model.embed_tokens.weight", VOCAB, HIDDEN, Q.Q8_0),
           ("output_norm.weight", "model.norm.weight", 1, HIDDEN, Q.F32),
           ("output.weight", "lm_head.weight", VOCAB, HIDDEN, Q.Q6_K)]
TYPES = [
    # q, k, v, o, gate, up, down
    [Q.Q4_K, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K],
    [Q.Q6_K, Q.Q4_K, Q.F32, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16],
]
for i in range(LAYERS):
    hf = f"model.layers.{i}"
    q, k, v, o, gate, up, down = TYPES[i]
    TENSORS += [
        (f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", 1, HIDDEN, Q.F32),
        (f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", HIDDEN, HIDDEN, q),
        (f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN, k),
        (f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN, v),
        (f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", HIDDEN, HIDDEN, o),
        (f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", 1, HIDDEN, Q.F32),
        (f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", FFN, HIDDEN, gate),
        (f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", FFN, HIDDEN, up),
        (f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", HIDDEN, FFN, down),
    ]


def permute(weights, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def random_blocks(rng, qtype, rows, cols):
    """Random Q4_K or Q6_K blocks with finite, moderate scales (ggml's block layouts)."""
    blocks = cols // 256
    if qtype == Q.Q4_K:  # half d, half dmin, u8 scales[12], u8 qs[128]
        b = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
        b[..., 0:2] = np.float16(rng.uniform(0.002, 0.01, (rows, blocks, 1))).view(np.uint8)
        b[..., 2:4] = np.float16(rng.uniform(0.001, 0.005, (rows, blocks, 1))).view(np.uint8)
    else:  # u8 ql[128], u8 qh[64], i8 scales[16], half d
        b = rng.integers(0, 256, size=(rows, blocks, 210), dtype=np.uint8)
        b[..., 208:210] = np.float16(rng.uniform(0.0002, 0.001, (rows, blocks, 1))).view(np.uint8)
    return b.reshape(rows, blocks * b.shape[-1])


def main():
    rng = np.random.default_rng(7)
    os.makedirs(os.path.join(OUT, "hf"), exist_ok=True)
    writer = GGUFWriter(os.path.join(OUT, "tiny.gguf"), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(THETA)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    reference = {}
    for gguf_name, hf_name, rows, cols, qtype in TENSORS:
        if qtype in (Q.Q4_K, Q.Q6_K):
            stored = random_blocks(rng, qtype, rows, cols)
        else:
            w = rng.normal(0.0, 0.05, (rows, cols)).astype(np.float32)
            if rows == 1:
                w = 1.0 + w  # norm weights near 1
            stored = quants.quantize(w, qtype)
        value = quants.dequantize(stored, qtype).astype(np.float32).reshape(rows, cols)
        reference[hf_name] = value.reshape(cols) if rows == 1 else value
        if gguf_name.endswith("attn_q.weight"):
            stored = permute(stored, HEADS, HEADS)
        elif gguf_name.endswith("attn_k.weight"):
            stored = permute(stored, HEADS, KV_HEADS)
        if rows == 1:
            stored = stored.reshape(stored.shape[-1])
        writer.add_tensor(gguf_name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(reference, os.path.join(OUT, "hf", "model.safetensors"))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rope_theta": THETA,
        "rms_norm_eps": EPS, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": CONTEXT,
    }
    with open(os.path.join(OUT, "hf", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
