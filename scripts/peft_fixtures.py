"""A PEFT LoRA adapter fixture, for tests/suite/peft.rs.

Run by hand from the repository root after scripts/parity_fixtures.py (it adapts the `llama`
fixture; needs torch, transformers and peft, whose versions go into expected.json):

    python scripts/peft_fixtures.py
    python scripts/peft_fixtures.py --check runs/finetune   # after a finetune LoRA run

`--check OUT` loads finetune's LoRA adapter (`OUT/lora/adapter`) into PEFT on the bundled
model and prints its largest logit difference from the merged model finetune saved
(`OUT/lora/model`): PEFT reads what this crate writes.

It wraps tests/fixtures/parity/llama with a PEFT LoRA (r = 4, alpha = 8, on q, k, v, o, gate,
up and down), gives lora_B random values (PEFT starts them at zero, which would make the
adapter invisible), saves it with `save_pretrained` (adapter_config.json and
adapter_model.safetensors) into tests/fixtures/peft/llama-lora/, and writes expected.json:
the per-token log-probabilities of the adapted model for the parity fixture's token ids.
"""

import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BASE = os.path.join("tests", "fixtures", "parity", "llama")
OUT = os.path.join("tests", "fixtures", "peft", "llama-lora")


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    with open(os.path.join(BASE, "expected.json")) as f:
        ids = torch.tensor(json.load(f)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits, dim=-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT)
    os.remove(os.path.join(OUT, "README.md"))  # a generated model card
    expected = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "input_ids": ids.tolist(),
        "logprobs": logp.tolist(),
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print("llama-lora ok")


def check(out):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained("assets/tiny-llama", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, os.path.join(out, "lora", "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lora", "model"), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained("assets/tiny-llama", dtype=torch.float32).eval()
    ids = torch.tensor([list(b"12+30=42")])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (adapted, merged, plain))
    print(f"PEFT(adapter) vs merged: max logit diff {(a - b).abs().max().item():.2e}; "
          f"adapter's effect {(a - c).abs().max().item():.2f}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        main()
