"""The Qwen3-Omni-30B-A3B thinker, text path, in plain PyTorch.

Read top to bottom: config -> building blocks (RMSNorm, RoPE, attention, grouped MoE) ->
the Thinker -> loading the released safetensors checkpoint -> writing a random one.

The thinker's language model is a Qwen3 MoE decoder: pre-norm blocks, GQA attention with
per-head q/k RMSNorm before RoPE, and a top-k routed mixture of SwiGLU experts. Qwen3-Omni
uses interleaved multimodal RoPE (MRoPE), but for text every MRoPE axis carries the same
position, which makes it exactly ordinary 1-D RoPE: that is what we implement.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ThinkerConfig:
    """Text config of the thinker. Defaults are the released 30B-A3B values."""

    vocab_size: int = 152064
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128  # explicit: not hidden_size / heads
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    intermediate_size: int = 768  # width of dense MLP layers; the released model has none
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "ThinkerConfig":
        """Accepts the full Qwen3-Omni config, a thinker-only config or a bare text config."""
        model_type = cfg.get("model_type", "")
        if "thinker_config" in cfg:
            cfg = cfg["thinker_config"]
            model_type = cfg.get("model_type", "qwen3_omni_moe_thinker")
        if "text_config" in cfg:
            cfg = cfg["text_config"]
            model_type = cfg.get("model_type", "qwen3_omni_moe_text")
        if model_type not in ("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text"):
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a Qwen3-Omni MoE config "
                "(expected qwen3_omni_moe, qwen3_omni_moe_thinker or qwen3_omni_moe_text)"
            )
        # rope: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only default MRoPE)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        kwargs["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", cls.rope_theta)))
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        kwargs["mlp_only_layers"] = list(kwargs.get("mlp_only_layers") or [])
        if cfg.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not supported")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str) -> "ThinkerConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file!r} (is {path!r} a Qwen3-Omni model directory?)")
        with open(file) as f:
            return cls.from_dict(json.load(f), source=file)

    def to_hf_text_config(self) -> dict:
        """The `text_config` block of the released config.json."""
        d = asdict(self)
        d.pop("rope_theta")
        half = self.head_dim // 2  # MRoPE sections add up to head_dim / 2; released: [24, 20, 20]
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
        d.update(
            model_type="qwen3_omni_moe_text", hidden_act="silu", attention_bias=False, attention_dropout=0.0,
            shared_expert_intermediate_size=0, sliding_window=None, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, "mrope_section": sections,
                             "interleaved": True, "mrope_interleaved": True},
        )
        return d


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, cast back BEFORE the weight multiply (as the reference does)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """positions [B, T] -> cos, sin [B, T, head_dim], computed in fp32, cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class KVCache:
    """Preallocated keys/values for incremental decoding: [layers][B, kv_heads, max_len, D]."""

    def __init__(self, cfg: ThinkerConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store k, v [B, kvH, t, D] after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, kvH, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, kvH, S, D]
        # GQA: expand kv heads to query heads (a view until SDPA needs it contiguous)
        groups = self.n_heads // self.n_kv
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.n_heads, -1, self.head_dim)
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.n_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Dense SwiGLU, used only by layers listed in `mlp_only_layers`."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts of one layer, stacked, so one module owns them (one ZeRO-3 gather per layer).

    Input rows arrive sorted by expert; `counts[e]` rows belong to expert e. Each expert that
    received tokens runs one matmul over all of them; experts with no tokens cost nothing.
    `project` is the per-expert linear map, the hook where lora.py adds its per-expert delta.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def per_expert(self) -> dict:
        """name -> tuple of per-expert views. `unbind` once per forward: indexing w[e] for every
        expert would give autograd one node per expert, each producing a zero-filled gradient
        of the whole stack in backward."""
        return {"gate_up_proj": self.gate_up_proj.unbind(0), "down_proj": self.down_proj.unbind(0)}

    def project(self, x, e: int, which: str, w: dict):
        return x @ w[which][e].T

    def forward(self, x_sorted, counts: list[int]):
        """x_sorted [S, H] grouped by expert -> [S, H]."""
        w = self.per_expert()
        out = []
        for e, x in enumerate(x_sorted.split(counts)):
            if x.shape[0] == 0:
                continue
            gate, up = self.project(x, e, "gate_up_proj", w).chunk(2, dim=-1)  # [n, I] each
            out.append(self.project(F.silu(gate) * up, e, "down_proj", w))  # [n, H]
        return torch.cat(out)


class SparseMoE(nn.Module):
    """Top-k routed mixture of experts. Mark this class as a ZeRO-3 leaf module: its expert
    call pattern is data dependent, so it must be gathered as one unit on every rank."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)  # [N, H]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # [N, E], over ALL experts, fp32
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # group the N*K (token, expert) pairs by expert
        flat_ids = expert_ids.reshape(-1)  # [N*K]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.experts.num_experts).tolist()
        y = self.experts(x[order // self.top_k], counts)  # [N*K, H], sorted by expert
        y = y * weights.reshape(-1)[order, None]
        # un-sort and add the K expert outputs of each token (the reference sums a [N, K, H] stack)
        out = torch.empty_like(y)
        out[order] = y
        return out.view(-1, self.top_k, H).sum(dim=1).view(B, T, H)


class Block(nn.Module):
    def __init__(self, cfg: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# The thinker


def positions_and_mask(attention_mask, T: int):
    """attention_mask [B, S] (1 = token, 0 = pad; S = cached + new) for the last T new tokens ->
    positions [B, T] and the boolean SDPA mask [B, 1, T, S].

    A token's position is the number of real tokens before it, so left padding starts at 0.
    A query sees the real keys at or before it; it always sees itself too, which only matters
    for pad queries (their output is unused) and keeps their softmax finite.
    """
    B, S = attention_mask.shape
    valid = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, S - T:]
    q_idx = torch.arange(S - T, S, device=valid.device)[:, None]  # absolute index of each query
    k_idx = torch.arange(S, device=valid.device)[None, :]
    causal = k_idx <= q_idx  # [T, S]
    mask = (causal[None] & valid[:, None, :]) | (k_idx == q_idx)[None]  # [B, T, S]
    return positions, mask[:, None]


class LMHead(nn.Linear):
    """The output projection [H] -> [V]. A few rows at a time (decoding) on CPU are computed
    as (W @ x^T)^T: MKL's small-M path for x @ W^T takes twice as long there (4 rows x 152064,
    BENCHMARKS.md). Being the module's own forward, ZeRO-3's hooks still gather the weight."""

    def forward(self, x):
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 16:
            return torch.mm(self.weight, x.t()).t().contiguous()  # [V, B] -> [B, V]
        return super().forward(x)


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, return_hidden: bool = False):
        """input_ids [B, T] (the new tokens when decoding with `cache`); attention_mask [B, S]
        covers cached + new tokens. Returns logits [B, T, V], or the final normed hidden
        states [B, T, H] with `return_hidden` (the trainer projects only the positions it scores)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        x = self.embed_tokens(input_ids)  # [B, T, H]
        positions, mask = positions_and_mask(attention_mask, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)


# ----------------------------------------------------------------------------------------------
# Loading the released checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}

# Prefixes of thinker text tensors in the files we accept, longest first. The released full
# model writes `thinker.model.*`, a fresh thinker-only save `model.*`; transformers 5's in-memory
# names use `model.language_model.*`.
_TEXT_PREFIXES = ("thinker.model.language_model.", "thinker.model.", "model.language_model.", "model.")
_LM_HEAD_KEYS = ("thinker.lm_head.weight", "lm_head.weight")
_PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _target(key: str):
    """Checkpoint key -> (our parameter name, index into it or None), or None if not a text tensor."""
    if key in _LM_HEAD_KEYS:
        return "lm_head.weight", None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix):]
            break
    else:
        return None  # audio/vision towers, talker, code2wav
    m = _PER_EXPERT.match(name)
    if m is None:
        return name, None
    stem, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return f"{stem}.down_proj", (e,)
    half = 0 if proj == "gate_proj" else 1  # gate rows first, then up rows
    return f"{stem}.gate_up_proj", (e, half)


def non_text_tensors(path: str):
    """(key, tensor) pairs of everything in a checkpoint that is not the thinker's text model
    (audio and vision towers, talker, code2wav), read one at a time."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for key, shard in _shard_map(path).items():
        if _target(key) is None:
            by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        with safe_open(shard, framework="pt") as f:
            for key in keys:
                yield key, f.get_tensor(key)


def _shard_map(path: str) -> dict[str, str]:
    """tensor name -> shard file, from the index or the single-file checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{path!r} has neither model.safetensors.index.json nor model.safetensors")


def copy_into_param(param: nn.Parameter, value: torch.Tensor):
    """Default destination: the whole tensor lives in this process."""
    param.data.copy_(value)


def copy_into_zero3_partition(param: nn.Parameter, value: torch.Tensor):
    """ZeRO-3 destination: copy only this rank's slice of the flattened tensor into its partition,
    so no rank ever holds more than the tensor being loaded."""
    part = param.ds_tensor  # this rank's flat shard, padded to the same size on every rank
    start = part.ds_numel * torch.distributed.get_rank()
    flat = value.reshape(-1)
    n = max(0, min(part.ds_numel, flat.numel() - start))
    if n:
        part.data[:n].copy_(flat[start:start + n])


def load_weights(model: Thinker, path: str, assign=copy_into_param):
    """Stream the thinker text tensors of a checkpoint into `model`, shard by shard.

    Each tensor is read, cast and copied into place before the next is read. Per-expert keys
    are staged into one layer's stacked tensor and copied when the layer is complete, so the
    extra memory is at most one stacked expert tensor.
    """
    from safetensors import safe_open

    shapes = {n: tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    shard_of = _shard_map(path)
    wanted: dict[str, list[str]] = {}
    for key, shard in shard_of.items():
        if _target(key) is not None:
            wanted.setdefault(shard, []).append(key)
    done: set[str] = set()
    staging: dict[str, tuple[torch.Tensor, set]] = {}  # stacked name -> (buffer, pieces seen)
    tied = model.cfg.tie_word_embeddings
    for shard, keys in sorted(wanted.items()):
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"shard {shard!r} is listed in the index but does not exist")
        try:
            f = safe_open(shard, framework="pt")
        except Exception as err:
            raise OSError(f"cannot read safetensors shard {shard!r}: {err}") from err
        with f:
            on_disk = set(f.keys())
            for key in sorted(keys):
                if key not in on_disk:
                    raise KeyError(f"tensor {key!r} is listed in the index for {shard!r} but is not in that file")
                name, index = _target(key)
                if name == "lm_head.weight" and tied:
                    continue
                if name not in shapes:
                    raise KeyError(f"{shard}: tensor {key!r} does not fit this model (no parameter {name!r}; "
                                   f"config has {model.cfg.num_hidden_layers} layers)")
                try:
                    value = f.get_tensor(key)
                except Exception as err:
                    raise OSError(f"cannot read tensor {key!r} from {shard!r}: {err}") from err
                if not value.is_floating_point():
                    raise TypeError(f"{shard}: tensor {key!r} has dtype {value.dtype}, expected floating point")
                full = shapes[name]
                expected = full if index is None else (full[1:] if len(index) == 1 else (full[1] // 2, full[2]))
                if tuple(value.shape) != tuple(expected):
                    raise ValueError(f"{shard}: tensor {key!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(expected)} for {name!r}")
                if index is None:
                    assign(params[name], value)
                    done.add(name)
                    continue
                buf, seen = staging.setdefault(name, (torch.empty(full, dtype=value.dtype), set()))
                if len(index) == 1:
                    buf[index[0]].copy_(value)
                else:
                    rows = full[1] // 2
                    buf[index[0], index[1] * rows:(index[1] + 1) * rows].copy_(value)
                seen.add(index)
                pieces = full[0] * (1 if name.endswith("down_proj") else 2)
                if len(seen) == pieces:
                    assign(params[name], buf)
                    done.add(name)
                    del staging[name]
    missing = [n for n in shapes if n not in done and not (tied and n == "lm_head.weight")]
    if missing:
        hint = "" if not staging else f" (incomplete experts: {sorted(staging)})"
        raise KeyError(f"{path}: checkpoint is missing {len(missing)} tensor(s) of the thinker, "
                       f"e.g. {missing[:5]}{hint}")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight


def load_thinker(path: str, dtype=torch.bfloat16, device="cpu") -> Thinker:
    """Build the thinker without initialising it (meta device) and stream the checkpoint in:
    the only full copy of the weights is the model itself."""
    dtype = resolve_dtype(dtype)
    cfg = ThinkerConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Thinker(cfg).to(dtype)
    model.to_empty(device=device)
    load_weights(model, path)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# A random checkpoint in the released layout (tests and the embedded default run)


def init_random_(model: Thinker, seed: int = 0, std: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.dim() == 1:  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def released_tensors(named, prefix: str = "thinker."):
    """(our name, tensor) pairs -> (released key, tensor) pairs, experts split per expert."""
    for name, p in named:
        if name == "lm_head.weight":
            yield f"{prefix}lm_head.weight", p
            continue
        stem = f"{prefix}model.{name}"
        if name.endswith("experts.gate_up_proj"):
            gate, up = p.chunk(2, dim=1)
            for e in range(p.shape[0]):
                yield stem.replace("gate_up_proj", f"{e}.gate_proj.weight"), gate[e]
                yield stem.replace("gate_up_proj", f"{e}.up_proj.weight"), up[e]
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                yield stem.replace("down_proj", f"{e}.down_proj.weight"), p[e]
        else:
            yield stem, p


def save_released(cfg: ThinkerConfig, named, path: str, dtype=torch.bfloat16, max_shard_bytes: int = 2 * 2**30,
                  extra=(), config: dict | None = None):
    """Write (our name, tensor) pairs as config.json + sharded safetensors + index in the released
    layout. Tensors are consumed one at a time; at most one shard is held in memory. `extra`
    yields (released key, tensor) pairs written as they are (e.g. a base model's audio and
    vision towers); `config` replaces the generated config.json."""
    from safetensors.torch import save_file

    dtype = resolve_dtype(dtype)
    os.makedirs(path, exist_ok=True)
    weight_map, current, size, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal current, size, n
        n += 1
        fname = f"model-{n:05d}.safetensors"  # renamed to -of-N below, once N is known
        save_file(current, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in current})
        current, size = {}, 0

    for key, t in itertools.chain(released_tensors(named), extra):
        t = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = t
        size += nbytes
        total += nbytes
    flush()
    final = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    for old, new in final.items():
        os.replace(os.path.join(path, old), os.path.join(path, new))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}},
                  f, indent=2)
    config = config or {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
        "enable_audio_output": False,
        "thinker_config": {"model_type": "qwen3_omni_moe_thinker", "text_config": cfg.to_hf_text_config()},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_random_checkpoint(cfg: ThinkerConfig, path: str, seed: int = 0, dtype=torch.float32,
                            max_shard_bytes: int = 2 * 2**30, std: float = 0.02) -> str:
    """A randomly initialised thinker in the released layout (`thinker.` prefix, per-expert keys)."""
    model = Thinker(cfg)
    init_random_(model, seed, std)
    save_released(cfg, model.state_dict().items(), path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return path


# ----------------------------------------------------------------------------------------------
# Decoding


def greedy(logits):
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate(model: Thinker, prompt_ids, prompt_mask, max_new_tokens: int, eos_ids, pad_id: int,
             pick_next=greedy, all_done=None):
    """KV-cache decoding from left-padded prompts [B, P].

    `pick_next(logits [B, V]) -> ids [B]` chooses each token (greedy by default). A row stops at
    its first eos. `all_done(local_done: bool) -> bool` lets data-parallel ranks agree on when to
    stop: under ZeRO-3 every rank must run the same number of forward calls, so a rank whose rows
    are finished keeps stepping until every rank is.
    Returns completion ids [B, C] (pad after the first eos) and a mask [B, C] that is 1 up to and
    including the first eos; C <= max_new_tokens.
    """
    B, P = prompt_ids.shape
    first = next(model.parameters())
    cache = KVCache(model.cfg, B, P + max_new_tokens, first.dtype, prompt_ids.device)
    eos = torch.tensor(list(eos_ids), device=prompt_ids.device)
    mask = prompt_mask

    def next_logits(ids):  # only the last position needs logits: [B, V], not [B, T, V]
        return model.lm_head(model(ids, mask, cache, return_hidden=True)[:, -1])

    logits = next_logits(prompt_ids)
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive = [], []
    for _ in range(max_new_tokens):
        nxt = pick_next(logits.float())  # [B]
        alive.append(~finished)
        tokens.append(torch.where(finished, torch.full_like(nxt, pad_id), nxt))
        finished = finished | torch.isin(nxt, eos)
        done = bool(finished.all())
        if (all_done(done) if all_done is not None else done) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = next_logits(tokens[-1][:, None])
    return torch.stack(tokens, 1), torch.stack(alive, 1).long()
