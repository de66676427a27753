"""Chat-template fixtures from transformers, for tests/suite/chat.rs.

Run by hand from the repository root (needs transformers and tokenizers; the versions are
written into each expected.json):

    python scripts/chat_fixtures.py

For two templates in the styles of Llama 3 and Qwen2.5 (ChatML) it writes
tests/fixtures/chat/<name>/ with a small byte-level BPE tokenizer.json (trained here on a few
sentences, with the template's special tokens), tokenizer_config.json holding the template,
generation_config.json and config.json with end-of-sequence ids, and expected.json: for each
conversation, transformers' `apply_chat_template` text (with and without the generation
prompt) and token ids, and the special tokens transformers resolves.
"""

import json
import os
import shutil

import tokenizers
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

OUT = os.path.join("tests", "fixtures", "chat")

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"You are a helpful assistant.\" %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

CASES = {
    "llama3": dict(
        template=LLAMA3,
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        # Llama 3.1 Instruct: config.json has the base model's EOS, generation_config.json three.
        config_eos="<|end_of_text|>",
        generation_eos=["<|end_of_text|>", "<|eot_id|>"],
    ),
    "chatml": dict(
        template=CHATML,
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        config_eos="<|im_end|>",
        generation_eos=["<|im_end|>", "<|endoftext|>"],
    ),
}

CHATS = [
    [
        {"role": "user", "content": "What is 12+30?"},
        {"role": "assistant", "content": "12+30 = 42."},
    ],
    [
        {"role": "system", "content": "  Answer briefly.  "},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Teal. "},
        {"role": "user", "content": "And another?"},
        {"role": "assistant", "content": "Ochre, a warm yellow-brown."},
    ],
]

CORPUS = [
    "What is 12+30? 12+30 = 42. Answer briefly. Name a colour. Teal. And another?",
    "Ochre, a warm yellow-brown. You are a helpful assistant. Today Date: 26 Jul 2024",
    "You are Qwen, a helpful assistant. system user assistant",
]


def main():
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    for name, case in CASES.items():
        path = os.path.join(OUT, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=case["special"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(CORPUS, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=case["bos"], eos_token=case["eos"]
        )
        fast.chat_template = case["template"]
        fast.save_pretrained(path)
        ids = lambda t: fast.convert_tokens_to_ids(t)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "eos_token_id": ids(case["config_eos"])}, f)
        GenerationConfig(eos_token_id=[ids(t) for t in case["generation_eos"]]).save_pretrained(path)
        expected = {"versions": versions, "chats": []}
        for chat in CHATS:
            expected["chats"].append(
                {
                    "messages": chat,
                    "text": fast.apply_chat_template(chat, tokenize=False),
                    "ids": fast.apply_chat_template(chat, tokenize=True, return_dict=False),
                    "prompt_text": fast.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True),
                }
            )
        gen = GenerationConfig.from_pretrained(path)
        expected["generation_eos"] = gen.eos_token_id
        expected["tokenizer_eos"] = fast.eos_token_id
        expected["tokenizer_bos"] = fast.bos_token_id
        with open(os.path.join(path, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(name, "ok")


if __name__ == "__main__":
    main()
