"""The context a node can serve: GPUs fitted to the weights plus the KV cache of that context, as
vLLM 0.32 sizes them at start, from the model's config.json.

vLLM starts at the model's full context unless told otherwise (config/model.py 2621-2634) and
refuses when one request of that length doesn't fit the KV cache (v1/core/kv_cache_utils.py
1021-1040, "To serve at least one request with the model's max seq len ..."). So a GPU option fits
a context when, per GPU:

    total x 0.92 - weights / GPUs - overhead  >=  tokens x KV bytes a token on one GPU

- 0.92: vLLM's default gpu_memory_utilization (config/cache.py 102); the CUDA context and NCCL
  come out of the other 8 % (v1/worker/gpu_worker.py 534-537 measures after them).
- overhead: what the profile run and the graphs take before the KV cache (gpu_worker.py 676-744:
  requested - non_kv_cache_memory - cudagraph estimate). The profile run's transient peak is the
  larger of the forward pass over max_num_batched_tokens (gate/up and activation outputs, qkv,
  residual copies) and the sampler over min(tokens, max_num_seqs) rows of the vocabulary in float32
  (v1/sample/sampler.py 96-97, topk_topp_sampler.py: about 16 bytes an element); the batch sizes are
  vLLM's `serve` defaults for the GPU's memory (engine/arg_utils.py 2894-2985). Plus GRAPHS_GIB for
  CUDA graphs (measured by vLLM at start: gpu_model_runner.py 6333-6477) and WORKSPACE_GIB for
  buffers made after its memory snapshot. Both are our allowance, not vLLM's figure: conservative.
- KV bytes a token: per layer 2 (K and V) x KV heads on this GPU x head size x dtype bytes, the KV
  heads split across tensor-parallel ranks but never below one (config/model.py 1650-1670). MLA
  models (DeepSeek: kv_lora_rank) keep one latent of kv_lora_rank + qk_rope_head_dim a layer, on
  every rank (kv_cache_interface.py 686-698). Sliding-window layers are counted as full attention
  (vLLM keeps less for them: kv_cache_interface.py 858-896), so a model with them fits at least the
  context we say.

The local target is a CPU node whose KV cache is fixed (VLLM_CPU_KVCACHE_SPACE, in GiB): it goes
through the same rule with that as the budget and nothing else taken from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
UTILIZATION = 0.92
GRAPHS_GIB = 1.0
WORKSPACE_GIB = 0.5
BLOCK_TOKENS = 16  # vLLM's default block on a GPU (config/cache.py 72); one is reserved (kv_cache_utils.py 2627)
MIN_CONTEXT = 2048  # below this a node is no use for chat: it fits nothing
# Model dtype bytes (config `torch_dtype`/`dtype`); float32 checkpoints are served as bf16 on GPUs
# (config/model.py 2405-2446), and so is a config that names none.
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 2, "float8_e4m3fn": 1}
# nvidia-smi's memory.total of each card, MiB: what vLLM's 0.92 is a share of (not the box's GB).
MEMORY_MIB = {"T4": 15360, "L4": 23034, "A10G": 23028, "A10": 23028, "L40S": 46068, "A100": 40960,
              "A100-80GB": 81920, "H100": 81559, "H200": 143771, "B200": 183359}
# Keys vLLM derives the full context from, the least of those present (config/model.py 2527-2666).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                "max_sequence_length", "max_seq_length", "seq_len")


@dataclass(frozen=True)
class Model:
    """What config.json says of the memory a model needs beside its weights."""

    layers: int
    kv_heads: int
    head_size: int  # K and V each (MLA: the latent)
    dtype_bytes: int
    full_context: int
    hidden: int
    intermediate: int
    vocab: int
    mla: bool = False
    sliding: bool = False

    heads: int = 1  # attention heads: tensor parallelism must divide them
    tied: bool = False  # the output layer shares the embedding's weights

    @classmethod
    def from_config(cls, config: dict) -> Model | None:
        """The model as vLLM 0.32 reads config.json; None where its fields are not the ones this
        reads (then only the weights are fitted)."""
        try:
            return cls._read(config)
        except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    @classmethod
    def _read(cls, top: dict) -> Model | None:
        config = top.get("text_config") or top  # a multimodal model's language half
        heads = config.get("num_attention_heads") or 1
        hidden = config.get("hidden_size") or 0
        kv_heads = next((config[k] for k in ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
                         if config.get(k)), heads)
        mla = bool(config.get("kv_lora_rank"))
        head = (config["kv_lora_rank"] + (config.get("qk_rope_head_dim") or 0)) if mla else (
            config.get("head_dim") or hidden // heads)
        layers = config.get("num_hidden_layers") or 0
        if not (layers and head and hidden):
            return None  # GPT-2's n_layer, MPT's d_model, ...: fields this does not read
        dtype = str(config.get("torch_dtype") or config.get("dtype") or top.get("torch_dtype") or "bfloat16")
        return cls(layers=layers, kv_heads=1 if mla else kv_heads, head_size=head,
                   dtype_bytes=DTYPE_BYTES.get(dtype.removeprefix("torch."), 2), full_context=_full_context(top, config),
                   hidden=hidden, intermediate=config.get("intermediate_size") or 4 * hidden,
                   vocab=config.get("vocab_size") or 0, mla=mla, sliding=bool(config.get("sliding_window")),
                   heads=heads, tied=bool(config.get("tie_word_embeddings", top.get("tie_word_embeddings", False))))

    def weight_bytes(self) -> int:
        """About what the weights take, for a model whose files are not listed (a Hub launch of an
        unstaged model): attention, a gated MLP and the embeddings, in the model's dtype."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_size
        return self.dtype_bytes * (self.layers * (attention + 3 * self.hidden * self.intermediate)
                                   + (1 if self.tied else 2) * self.vocab * self.hidden)

    def kv_bytes_per_token(self, gpus: int = 1) -> int:
        """KV cache one token takes on each of `gpus` tensor-parallel GPUs."""
        heads = 1 if self.mla else max(1, self.kv_heads // gpus)
        return self.layers * (1 if self.mla else 2) * heads * self.head_size * self.dtype_bytes

    def note(self) -> str:
        if self.mla:
            return "MLA: one latent a layer, on every GPU"
        return "sliding-window layers counted as full attention (vLLM keeps less)" if self.sliding else ""


def _full_context(top: dict, config: dict) -> int:
    """The context vLLM serves unless told otherwise (config/model.py 2527-2666): the least of the
    context keys (model_max_length wins where set), stretched by a RoPE scaling factor except for
    the types that already count it (llama3, yarn, ...) and Gemma 3, whose 128K is already scaled;
    LongRoPE serves its original context."""
    contexts = [config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)]
    context = config.get("model_max_length") or (min(contexts) if contexts else 2048)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "longrope":
        return int(config.get("original_max_position_embeddings") or context)
    gemma3 = "gemma3" in str(top.get("model_type", "")) + str(config.get("model_type", ""))
    if scaling.get("factor") and not gemma3 and kind not in (
            "su", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"):
        context = int(context * scaling["factor"])  # linear/dynamic scaling stretch the context
    return int(context)


def overhead_bytes(model: Model, gpu_gib: float, gpus: int) -> int:
    """What vLLM takes on each GPU before its KV cache, beside the weights (the module's docstring)."""
    tokens, seqs = (16384, 1024) if gpu_gib >= 160 else (8192, 1024) if gpu_gib >= 70 else (2048, 256)
    b = model.dtype_bytes
    forward = tokens * b * (3 * model.intermediate // gpus + 6 * model.hidden
                            + 3 * model.kv_heads * model.head_size // gpus)
    sampler = 16 * min(tokens, seqs) * model.vocab + tokens * model.hidden * b
    return int(max(forward, sampler) + (GRAPHS_GIB + WORKSPACE_GIB) * GIB)


def usable_bytes(gpu: str) -> int:
    """What vLLM takes of one `gpu`'s memory: its gpu_memory_utilization share."""
    return math.ceil(MEMORY_MIB[gpu] * 2**20 * UTILIZATION)


def kv_budget_bytes(model: Model, weights: int, gpu: str, gpus: int) -> int:
    """The KV cache vLLM will have on each GPU of `gpus` x `gpu` serving these weights."""
    return int(usable_bytes(gpu) - weights / gpus - overhead_bytes(model, MEMORY_MIB[gpu] / 1024, gpus))


def context_fitting(model: Model, kv_budget: int, gpus: int = 1, block: int = BLOCK_TOKENS) -> int:
    """The longest context one request may have within `kv_budget` bytes of KV cache on each GPU
    (one block held back, as vLLM does), at most the model's own; 0 when none."""
    per_token = model.kv_bytes_per_token(gpus)
    if kv_budget <= 0:
        return 0
    if per_token <= 0:
        return model.full_context
    tokens = (kv_budget - block * per_token) // per_token
    return max(0, min(model.full_context, tokens // block * block))


def context_on(model: Model, weights: int, gpu: str, gpus: int) -> int:
    return context_fitting(model, kv_budget_bytes(model, weights, gpu, gpus), gpus)
