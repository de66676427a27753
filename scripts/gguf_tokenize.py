#!/usr/bin/env python3
"""Token ids of a text under the byte-level BPE tokenizer stored in a GGUF file's metadata
(tokenizer.ggml.tokens and .merges, `tokenizer.ggml.model = gpt2`), as JSON on stdout, for
examples/gguf_check.rs. Needs gguf and tokenizers (pip).

    python3 scripts/gguf_tokenize.py model.gguf "The capital of France is Paris." > ids.json
"""

import json
import sys

from gguf import GGUFReader
from tokenizers import Tokenizer, models, pre_tokenizers


def main():
    path, text = sys.argv[1], sys.argv[2]
    r = GGUFReader(path)
    model = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "gpt2":
        raise SystemExit(f"{path}: tokenizer.ggml.model is {model!r}, not gpt2 (byte-level BPE)")
    f = r.fields["tokenizer.ggml.tokens"]
    vocab = {bytes(f.parts[i]).decode("utf-8"): n for n, i in enumerate(f.data)}
    f = r.fields["tokenizer.ggml.merges"]
    merges = [tuple(bytes(f.parts[i]).decode("utf-8").split(" ", 1)) for i in f.data]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    json.dump(tok.encode(text).ids, sys.stdout)
    print()


if __name__ == "__main__":
    main()
