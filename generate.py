"""The Qwen3-Omni-30B-A3B thinker's language model in plain PyTorch: text, and the language-model
side of audio/image/video prompts.

Read top to bottom: config -> building blocks (RMSNorm, RoPE and MRoPE, attention, grouped MoE) ->
multimodal positions (rope_index) -> the Thinker (with MediaEmbeds, and the towers of towers.py
when a run has media) -> loading the released safetensors checkpoint -> writing one -> decoding.

The thinker's language model is a Qwen3 MoE decoder: pre-norm blocks, GQA attention with
per-head q/k RMSNorm before RoPE, and a top-k routed mixture of SwiGLU experts. Qwen3-Omni
uses interleaved multimodal RoPE (MRoPE): every token has a (time, height, width) position and
each rotary frequency reads one of the three. For text the three are equal, which makes it
exactly ordinary 1-D RoPE: text-only batches take that path. Media tokens (the outputs of the
audio and vision towers, scattered over placeholder tokens) get 3-D positions from `rope_index`.

The towers (towers.py) are built and loaded only when a run asks for them
(`ThinkerConfig.from_pretrained(path, towers=True)`, `load_thinker(..., towers=True)`): a text-only
run holds exactly the language model.
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

from towers import AudioConfig, AudioEncoder, VisionConfig, VisionEncoder, audio_token_count


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class ThinkerConfig:
    """The thinker's config: its language model (`text_config`), the media ids and timing, and the
    towers' configs when the run uses them. Defaults are the released 30B-A3B values."""

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
    # MRoPE: how the head_dim/2 rotary frequencies are shared by the (time, height, width) axes.
    # None -> default_mrope_section(head_dim), which is the released [24, 20, 20] at head_dim 128.
    mrope_section: list[int] | None = None
    # Multimodal placeholder ids and timing, at the thinker_config level of config.json (siblings of
    # text_config). Released values; transformers' class defaults differ for audio_token_id (151646),
    # audio_start_token_id (151647) and position_id_per_seconds (25). The ids may lie outside a tiny
    # test vocab: they are only looked up when media is passed.
    audio_token_id: int = 151675  # <|audio_pad|>
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656  # <|video_pad|>
    audio_start_token_id: int = 151669  # <|audio_start|>
    audio_end_token_id: int = 151670  # <|audio_end|>
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653  # <|vision_end|>
    position_id_per_seconds: int = 13  # MRoPE time ticks per second: 1 audio token = 1 tick; video t*spg*13
    spatial_merge_size: int = 2  # vision_config: a 2x2 block of 16-px patches is one LM token
    # The towers (thinker_config.audio_config / vision_config). None = not built: from_dict reads them
    # only with towers=True, so a text-only run never builds, loads or even validates them.
    audio_config: AudioConfig | None = None
    vision_config: VisionConfig | None = None

    def __post_init__(self):
        if self.mrope_section is None:
            self.mrope_section = default_mrope_section(self.head_dim)
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 numbers adding up to head_dim/2 = "
                             f"{self.head_dim // 2}")
        # the towers' outputs replace token embeddings, so they must come out at the LM's width
        if self.audio_config is not None and self.audio_config.output_dim != self.hidden_size:
            raise ValueError(f"audio_config.output_dim {self.audio_config.output_dim} != hidden_size "
                             f"{self.hidden_size}")
        if self.vision_config is not None:
            if self.vision_config.out_hidden_size != self.hidden_size:
                raise ValueError(f"vision_config.out_hidden_size {self.vision_config.out_hidden_size} != "
                                 f"hidden_size {self.hidden_size}")
            if self.vision_config.spatial_merge_size != self.spatial_merge_size:
                raise ValueError(f"vision_config.spatial_merge_size {self.vision_config.spatial_merge_size} != "
                                 f"spatial_merge_size {self.spatial_merge_size}")

    @property
    def has_towers(self) -> bool:
        return self.audio_config is not None or self.vision_config is not None

    def placeholder_id(self, modality: str) -> int:
        """The token a modality's tower outputs replace: 'audio', 'image' or 'video'."""
        ids = {"audio": self.audio_token_id, "image": self.image_token_id, "video": self.video_token_id}
        if modality not in ids:
            raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(ids)}")
        return ids[modality]

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config", towers: bool = False) -> "ThinkerConfig":
        """Accepts the full Qwen3-Omni config, a thinker-only config or a bare text config.
        towers=True also reads the audio and vision towers' configs (both must be there)."""
        model_type = cfg.get("model_type", "")
        thinker = {}
        if "thinker_config" in cfg:
            cfg = cfg["thinker_config"]
            model_type = cfg.get("model_type", "qwen3_omni_moe_thinker")
        if "text_config" in cfg:
            thinker = cfg
            cfg = cfg["text_config"]
            model_type = cfg.get("model_type", "qwen3_omni_moe_text")
        if model_type not in ("qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text"):
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a Qwen3-Omni MoE config "
                "(expected qwen3_omni_moe, qwen3_omni_moe_thinker or qwen3_omni_moe_text)"
            )
        # rope: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        # The multimodal ids sit one level up, in the thinker config (`thinker` below; {} for a bare
        # text config, which keeps the released defaults).
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
        if rope.get("mrope_section") is not None:
            kwargs["mrope_section"] = list(rope["mrope_section"])
        kwargs.update({k: thinker[k] for k in MEDIA_CONFIG_KEYS if thinker.get(k) is not None})
        merge = (thinker.get("vision_config") or {}).get("spatial_merge_size")
        if merge is not None:
            kwargs["spatial_merge_size"] = merge
        if cfg.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not supported")
        if towers:
            for key, tower in (("audio_config", AudioConfig), ("vision_config", VisionConfig)):
                if not thinker.get(key):
                    raise ValueError(f"{source}: no thinker_config.{key}, so this checkpoint has no "
                                     f"{key.split('_')[0]} tower to encode media with")
                kwargs[key] = tower.from_dict(thinker[key], source)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str, towers: bool = False) -> "ThinkerConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file!r} (is {path!r} a Qwen3-Omni model directory?)")
        with open(file) as f:
            return cls.from_dict(json.load(f), source=file, towers=towers)

    def to_hf_text_config(self) -> dict:
        """The `text_config` block of the released config.json."""
        d = asdict(self)
        for k in ("rope_theta", "mrope_section", "spatial_merge_size", "audio_config", "vision_config",
                  *MEDIA_CONFIG_KEYS):
            d.pop(k)
        d.update(
            model_type="qwen3_omni_moe_text", hidden_act="silu", attention_bias=False, attention_dropout=0.0,
            shared_expert_intermediate_size=0, sliding_window=None, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "mrope_section": list(self.mrope_section), "interleaved": True,
                             "mrope_interleaved": True},
        )
        return d

    def to_hf_thinker_ids(self) -> dict:
        """The multimodal ids and timing, as written at the thinker_config level of config.json."""
        return {k: getattr(self, k) for k in MEDIA_CONFIG_KEYS}


# thinker_config keys read into ThinkerConfig (besides text_config and vision_config.spatial_merge_size)
MEDIA_CONFIG_KEYS = ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id",
                     "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "position_id_per_seconds")


def default_mrope_section(head_dim: int) -> list[int]:
    """How many of the head_dim/2 rotary frequencies follow the time, height and width axes when a
    config does not say: height and width get 5/16 of them each (rounded down), time the rest.
    head_dim 128 -> [24, 20, 20] (the released split); the tiny test models' 16 -> [4, 2, 2].
    Any split adding up to head_dim/2 is valid; this only fixes one for configs we write."""
    half = head_dim // 2
    hw = half * 5 // 16
    return [half - 2 * hw, hw, hw]


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


def mrope_cos_sin(positions, head_dim: int, theta: float, sections, dtype):
    """Interleaved MRoPE. positions [3, B, T] (time, height, width; float or int) -> cos, sin
    [B, T, head_dim], computed in fp32, cast to the activation dtype.

    Frequency slot j (of head_dim/2) takes its angle from one axis, interleaved T, H, W, T, H, W, ...:
    H on j % 3 == 1 and W on j % 3 == 2 for j < 3*sections[1] (resp. 3*sections[2]), T on all the
    others. Released [24, 20, 20] over 64 slots: H on 1, 4, ..., 58; W on 2, 5, ..., 59; T on
    0, 3, ..., 57 and 60..63. The slots are then doubled (cat) for the rotate-half layout, like 1-D RoPE.
    Same operation order as transformers (cos/sin per axis, then pick), so the values are bit-identical.
    With equal axes every slot gets the same angle as 1-D RoPE: text is unchanged.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [3, B, T, D/2]

    def pick(f):  # [3, B, T, D/2] -> [B, T, D]
        out = f[0].clone()  # time everywhere, then height and width overwrite their slots
        out[..., 1:3 * sections[1]:3] = f[1, ..., 1:3 * sections[1]:3]
        out[..., 2:3 * sections[2]:3] = f[2, ..., 2:3 * sections[2]:3]
        return torch.cat((out, out), dim=-1)

    return pick(freqs.cos()).to(dtype), pick(freqs.sin()).to(dtype)


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
        # GQA: each kv head serves n_heads / n_kv query heads; SDPA maps them itself instead of
        # us copying k and v n_heads / n_kv times (1.3-1.8x faster on CPU at 32/4 heads).
        # mask None: a whole sequence with every row's pads last (Thinker.forward), where causal
        # attention is exact and SDPA may pick FlashAttention (which takes no mask). is_causal
        # aligns the triangle top-left, right only when queries and keys are the same tokens.
        if mask is None and cache is not None:
            raise ValueError("attention over a KV cache needs the boolean mask")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # [B, H, T, D]
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

    Input rows arrive sorted by expert; `counts[e]` rows belong to expert e. Two ways to run them,
    the same arithmetic:
      loop     the spec: one matmul per expert that received tokens (experts with none cost
               nothing). `project` is the per-expert linear map, the hook where lora.py adds its
               per-expert delta. ~10 kernels per expert per forward + backward (~30 with
               LoRA): fine on CPU, where an op costs microseconds of Python and dispatch, but on
               a GPU each is a launch, and at 128 experts the launches, not the FLOPs, would set
               the step time.
      grouped  torch's grouped matmul (F.grouped_mm, as transformers' default experts path): one
               kernel runs every expert's matmul over its slice of the sorted rows, forward and
               backward, so a block costs a few dozen kernels whatever the expert count.
               `grouped_project` is its hook for lora.py.
    `grouped`: None picks per call (`use_grouped`: grouped on CUDA in bf16, the loop elsewhere);
    True / False force one (tests run both on CPU and hold the grouped path to the loop).
    """

    grouped: bool | None = None

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x_sorted, counts):
        """x_sorted [S, H] grouped by expert, counts [E] (tensor) rows per expert -> [S, H]."""
        if self.use_grouped(x_sorted):
            return self.forward_grouped(x_sorted, counts)
        return self.forward_loop(x_sorted, counts.tolist())

    def use_grouped(self, x) -> bool:
        if self.grouped is not None:
            return self.grouped
        return grouped_mm_pays(x, self.matrices())

    def matrices(self) -> list[torch.Tensor]:
        """The stacked weights the projections read (lora.py adds its A and B stacks)."""
        return [self.gate_up_proj, self.down_proj]

    # -- the spec: one matmul per expert

    def per_expert(self) -> dict:
        """name -> tuple of per-expert views. `unbind` once per forward: indexing w[e] for every
        expert would give autograd one node per expert, each producing a zero-filled gradient
        of the whole stack in backward."""
        return {"gate_up_proj": self.gate_up_proj.unbind(0), "down_proj": self.down_proj.unbind(0)}

    def project(self, x, e: int, which: str, w: dict):
        return x @ w[which][e].T

    def forward_loop(self, x_sorted, counts: list[int]):
        w = self.per_expert()
        out = []
        for e, x in enumerate(x_sorted.split(counts)):
            if x.shape[0] == 0:
                continue
            gate, up = self.project(x, e, "gate_up_proj", w).chunk(2, dim=-1)  # [n, I] each
            out.append(self.project(F.silu(gate) * up, e, "down_proj", w))  # [n, H]
        return torch.cat(out)

    # -- the fast path: one grouped matmul per projection

    def forward_grouped(self, x_sorted, counts):
        # offsets[e] = end of expert e's rows (int32, as the kernel wants); experts without rows
        # are empty slices the kernel skips. Built on the device: no host sync.
        offsets = counts.cumsum(0, dtype=torch.int32)  # [E]
        gate_up = self.grouped_project(x_sorted, "gate_up_proj", offsets, counts)  # [S, 2I]
        gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
        return self.grouped_project(F.silu(gate) * up, "down_proj", offsets, counts)  # [S, H]

    def grouped_project(self, x, which: str, offsets, counts):
        # [S, in] @ per expert [in, out] (the stack [E, out, in] transposed: a view, no copy) -> [S, out]
        return grouped_mm(x, getattr(self, which).transpose(1, 2), offsets)


def grouped_mm(x, w, offsets):
    """x [S, in], w [E, in, out], offsets [E] int32 (end of each group's rows) -> [S, out]: rows
    offsets[e-1]:offsets[e] times w[e]. F.grouped_mm (torch >= 2.10), else torch._grouped_mm, the
    same op under its earlier private name."""
    return (F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm)(x, w, offs=offsets)


def grouped_mm_pays(x, weights) -> bool:
    """Whether the grouped path is the one to take for activations `x` and stacked `weights`.

    On CUDA in bf16, where torch's fast grouped kernel runs (other dtypes would run its per-group
    fallback): compute capability 8.0+ with F.grouped_mm (torch >= 2.10), 9.0+ with the earlier
    torch._grouped_mm (Hopper only in torch 2.8), not at all before. Not on CPU: there an op
    launches nothing, both paths take the same time within ~10% either way (BENCHMARKS.md), and
    the loop is the spec. The kernel also wants every row 16-byte aligned (widths in bytes, data
    pointers); a shape that is not (e.g. LoRA rank 4 in bf16: 8-byte rows) keeps the loop."""
    if x.device.type != "cuda" or not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device) < ((8, 0) if hasattr(F, "grouped_mm") else (9, 0)):
        return False
    return all(t.dtype == torch.bfloat16 for t in (x, *weights)) and grouped_mm_aligned(weights)


def grouped_mm_aligned(weights) -> bool:
    """Every operand's and output's rows are multiples of 16 bytes and every stack starts on a
    16-byte boundary (torch's grouped kernels refuse anything else). weights: stacks [E, out, in];
    the activations share their widths and are fresh tensors (aligned by the allocator)."""
    return all(t.data_ptr() % 16 == 0 and t.shape[1] * t.element_size() % 16 == 0
               and t.shape[2] * t.element_size() % 16 == 0 for t in weights)


class SparseMoE(nn.Module):
    """Top-k routed mixture of experts. Mark this class as a ZeRO-3 leaf module: its expert
    call pattern is data dependent, so it must be gathered as one unit on every rank. Its
    parameters (router, expert stacks, their LoRA) are read inside this forward only."""

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
        # rows per expert [E]; scatter_add rather than bincount, which syncs with the host on CUDA
        counts = torch.zeros(self.experts.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
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
# Multimodal positions (MRoPE indices)
#
# A prompt with media, e.g. "text <|vision_start|> image_pad x N <|vision_end|> <|audio_start|>
# audio_pad x M <|audio_end|> text", gets one (time, height, width) position per token. Walking the
# real (non-pad) tokens of a row with a cursor `cur` (the next free position):
#   text-like token (text and the start/end markers):   (cur, cur, cur); cur += 1
#   image, grid (1, gh, gw) patches -> (gh/2) x (gw/2) tokens in row-major order:
#       (cur, cur + h, cur + w);                         cur = max over the block + 1
#   video, grid (gt, gh, gw), `spg` seconds per 2-frame slice -> t, then h, then w:
#       (cur + t*spg*13, cur + h, cur + w);              cur = max over the block + 1
#   audio, n tokens (13 per second of sound):   (cur + k, cur + k, cur + k); cur += n
# so audio and video share one clock (13 ticks per second) and text after a block continues past it.
# The time step t*spg*13 is float32 and not rounded: positions are float32, as in transformers 5.24.
#
# Audio in video (use_audio_in_video): "<|vision_start|><|audio_start|> V..A..V..A.. <|audio_end|>
# <|vision_end|>", the two start markers at cur, cur+1, then video and audio tokens interleaved by
# time (the processor emits a video token while its time <= the next audio token's), each keeping
# its own positions from base cur+2; the two end markers continue from the max of the block's LAST
# same-modality run + 1 (transformers' rule: usually the block max, lower when a wide video outlasts
# its audio in position).
#
# rope_delta (per row) = max position + 1 - number of real tokens. Generated tokens continue after
# the prompt's last position on all three axes (see `generate`; as transformers' generate), which is
# cumsum(mask) - 1 + rope_delta when the prompt ends in text after its largest position (not after
# such a "lower" audio-in-video end: there rope_delta would jump ahead, transformers' generate does not).


def rope_index(input_ids, attention_mask, cfg: ThinkerConfig, *, image_grid_thw=None, video_grid_thw=None,
               video_second_per_grid=None, audio_token_counts=None, use_audio_in_video: bool = False):
    """3-D MRoPE positions of prompts with media (transformers' `get_rope_index`, as a pure function).

    input_ids, attention_mask [B, S] (any padding side; None = no padding).
    image_grid_thw [n_img, 3], video_grid_thw [n_vid, 3]: patch grids (t, h, w) in prompt order over the
        whole batch (row 0's media first); video_second_per_grid [n_vid]: seconds per temporal grid step
        (temporal_patch_size / fps; 2.0 with the processor's default fps).
    audio_token_counts [n_audio] (optional): tokens per audio clip, checked against the placeholder runs
        (transformers takes frame counts instead; 13 tokens per 100 frames, towers.audio_token_count). Audio
        blocks are read from the ids, so the counts are not needed to place them.
    use_audio_in_video: the videos are audio-in-video blocks; must match the ids.
    Returns positions float32 [3, B, S] (pads 0) and rope_deltas float32 [B, 1].

    Without image and video grids (text or audio only) every axis is cumsum(mask) - 1, pads 1, as in
    transformers' 1-D branch. Placeholder runs that do not fit their grid raise ValueError.
    """
    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask == 1
    if image_grid_thw is None and video_grid_thw is None:
        for name in ("image", "video"):
            n = int((input_ids[real] == cfg.placeholder_id(name)).sum())
            if n:
                raise ValueError(f"{name}: the prompts hold {n} placeholder tokens but no {name}_grid_thw was given")
        if audio_token_counts is not None:
            n = int((input_ids[real] == cfg.audio_token_id).sum())
            want = int(torch.as_tensor(audio_token_counts).sum())
            if n != want:
                raise ValueError(f"audio: the prompts hold {n} placeholder tokens but audio_token_counts add up to "
                                 f"{want}")
        pos = attention_mask.float().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        deltas = pos.max(-1, keepdim=True)[0] + 1 - attention_mask.sum(-1, keepdim=True)
        return pos[None].expand(3, -1, -1), deltas
    media = _MediaQueue(cfg, image_grid_thw, video_grid_thw, video_second_per_grid, audio_token_counts,
                        use_audio_in_video)
    positions = torch.zeros(3, B, S, dtype=torch.float32, device=device)
    deltas = []
    for b in range(B):
        ids = input_ids[b][real[b]].tolist()
        row = _row_positions(ids, cfg, media)  # [3, n] float32
        positions[:, b, real[b]] = row.to(device)
        deltas.append(row.max() + 1 - len(ids) if len(ids) else torch.tensor(0.0))
    media.check_all_used()
    return positions, torch.stack(deltas).view(B, 1).to(device)


class _MediaQueue:
    """The grids / lengths of the batch's media, consumed in prompt order by `_row_positions`."""

    def __init__(self, cfg, image_grid_thw, video_grid_thw, video_second_per_grid, audio_token_counts,
                 use_audio_in_video):
        as_rows = lambda g: [] if g is None else [tuple(int(v) for v in r) for r in torch.as_tensor(g).view(-1, 3)]
        self.grids = {"image": as_rows(image_grid_thw), "video": as_rows(video_grid_thw)}
        self.spg = None if video_second_per_grid is None else \
            torch.as_tensor(video_second_per_grid).detach().cpu().float().view(-1)
        if self.grids["video"] and (self.spg is None or len(self.spg) < len(self.grids["video"])):
            raise ValueError(f"video: {len(self.grids['video'])} videos need video_second_per_grid for each, got "
                             f"{None if self.spg is None else len(self.spg)}")
        self.audio = None if audio_token_counts is None else \
            [int(n) for n in torch.as_tensor(audio_token_counts).view(-1)]
        self.used = {"image": 0, "video": 0, "audio": 0}
        self.use_audio_in_video = use_audio_in_video
        self.merge, self.pps = cfg.spatial_merge_size, cfg.position_id_per_seconds

    def next_grid(self, kind, n_tokens):
        """The next image/video grid; checks that the placeholder run has prod(grid)/merge^2 tokens."""
        i = self.used[kind]
        if i >= len(self.grids[kind]):
            raise ValueError(f"{kind}: the prompts hold more {kind} blocks than the {len(self.grids[kind])} rows "
                             f"of {kind}_grid_thw")
        self.used[kind] += 1
        t, h, w = self.grids[kind][i]
        need = t * h * w // self.merge ** 2
        if n_tokens != need:
            raise ValueError(f"{kind} {i}: grid {t}x{h}x{w} needs {need} placeholder tokens, the prompt holds "
                             f"{n_tokens}")
        return i, (t, h, w)

    def next_audio(self, n_tokens):
        i = self.used["audio"]
        self.used["audio"] += 1
        if self.audio is not None:
            if i >= len(self.audio):
                raise ValueError(f"audio: the prompts hold more audio blocks than the {len(self.audio)} "
                                 "audio_token_counts")
            if self.audio[i] != n_tokens:
                raise ValueError(f"audio {i}: {self.audio[i]} tokens expected, the prompt holds {n_tokens} "
                                 "placeholder tokens")

    def check_all_used(self):
        for kind, grids in self.grids.items():
            if self.used[kind] != len(grids):
                raise ValueError(f"{kind}: {len(grids)} {kind}_grid_thw rows but {self.used[kind]} {kind} blocks "
                                 "in the prompts")
        if self.audio is not None and self.used["audio"] != len(self.audio):
            raise ValueError(f"audio: {len(self.audio)} audio_token_counts but {self.used['audio']} audio blocks "
                             "in the prompts")

    def vision_positions(self, kind, i, grid, base):
        """Positions [3, t*h*w/merge^2] of one image/video, tokens in (t, h, w) order, from `base`.
        Same float32 operations as transformers (time steps t*spg*13 for video, t*1*13 for images)."""
        t, h, w = grid
        h, w = h // self.merge, w // self.merge
        if kind == "video":
            t_step = torch.arange(t) * self.spg[i] * self.pps
        else:
            t_step = (torch.arange(t) * 1 * self.pps).float()
        tt = t_step.view(-1, 1).expand(-1, h * w).flatten()
        hh = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten().float()
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten().float()
        return torch.stack([tt, hh, ww]) + base


def _run_length(ids, start, token_ids) -> int:
    """How many consecutive tokens from `start` are in `token_ids`."""
    end = start
    while end < len(ids) and ids[end] in token_ids:
        end += 1
    return end - start


def _row_positions(ids: list[int], cfg: ThinkerConfig, media: _MediaQueue):
    """The streaming rule above for one row's real tokens -> float32 [3, len(ids)].

    Built from runs exactly as transformers builds them (text run, start marker(s), block, end
    marker(s)), with the cursor a float32 scalar, so fractional video times round identically."""
    vs, as_ = cfg.vision_start_token_id, cfg.audio_start_token_id
    img, vid, aud = cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id
    pieces = []  # [3, k] position runs in token order

    def run(n, start):  # n text-like tokens from `start`: [3, n]
        return torch.arange(n, dtype=torch.float32).expand(3, n) + start

    def after_last():  # the cursor after the last run: its max + 1
        return pieces[-1].max() + 1 if pieces else torch.tensor(0.0)

    n, i = len(ids), 0  # i: first token not placed yet
    starts = [j for j, t in enumerate(ids) if (t == vs or t == as_) and j + 1 < n]
    for j in starts:
        if j < i:
            continue  # an <|audio_start|> inside an audio-in-video block
        nxt = ids[j + 1]
        if ids[j] == vs and nxt in (img, vid):
            kind, bos = ("image" if nxt == img else "video"), 1
        elif ids[j] == vs and nxt == as_ and j + 2 < n and ids[j + 2] in (aud, vid):
            kind, bos = "audio_in_video", 2
        elif ids[j] == as_ and nxt == aud:
            kind, bos = "audio", 1
        else:
            continue  # a lone marker: plain text
        if kind in ("video", "audio_in_video") and (kind == "audio_in_video") != media.use_audio_in_video:
            raise ValueError(f"video: found a {'plain video' if kind == 'video' else 'audio-in-video'} block with "
                             f"use_audio_in_video={media.use_audio_in_video}")
        cur = after_last()
        if j > i:  # text before the block
            pieces.append(run(j - i, cur))
            cur = cur + (j - i)
        pieces.append(run(bos, cur))  # <|vision_start|> / <|audio_start|> (both, for audio in video)
        cur = cur + bos
        k = j + bos  # first placeholder
        if kind == "audio":
            m = _run_length(ids, k, (aud,))
            media.next_audio(m)
            block = run(m, cur)
            last = block
        elif kind in ("image", "video"):
            m = _run_length(ids, k, (img if kind == "image" else vid,))
            idx, grid = media.next_grid(kind, m)
            block = media.vision_positions(kind, idx, grid, cur)
            last = block
        else:  # audio in video: video and audio tokens interleaved, each on its own positions
            m = _run_length(ids, k, (aud, vid))
            is_video = torch.tensor([t == vid for t in ids[k:k + m]])
            idx, grid = media.next_grid("video", int(is_video.sum()))
            media.next_audio(m - int(is_video.sum()))
            block = torch.empty(3, m)
            block[:, is_video] = media.vision_positions("video", idx, grid, cur)
            block[:, ~is_video] = run(m - int(is_video.sum()), cur)
            # the end markers follow the block's last same-modality run (transformers appends the
            # leftover of whichever modality outlasts the other as one piece and continues from it)
            other = (is_video != is_video[-1]).nonzero()
            last = block[:, int(other[-1]) + 1:] if len(other) else block
        pieces.append(block)
        eos = bos
        if k + m + eos > n:
            raise ValueError(f"{kind.split('_')[0]}: a block at token {j} is not closed by its end marker(s)")
        pieces.append(run(eos, last.max() + 1))  # <|vision_end|> / <|audio_end|>
        i = k + m + eos
    if i < n:
        pieces.append(run(n - i, after_last()))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0)


# ----------------------------------------------------------------------------------------------
# The thinker


def positions_and_mask(attention_mask, T: int, with_mask: bool = True):
    """attention_mask [B, S] (1 = token, 0 = pad; S = cached + new) for the last T new tokens ->
    positions [B, T] and the boolean SDPA mask [B, 1, T, S] (None unless with_mask).

    A token's position is the number of real tokens before it, so left padding starts at 0.
    A query sees the real keys at or before it; it always sees itself too, which only matters
    for pad queries (their output is unused) and keeps their softmax finite.
    """
    B, S = attention_mask.shape
    valid = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, S - T:]
    if not with_mask:
        return positions, None
    q_idx = torch.arange(S - T, S, device=valid.device)[:, None]  # absolute index of each query
    k_idx = torch.arange(S, device=valid.device)[None, :]
    causal = k_idx <= q_idx  # [T, S]
    mask = (causal[None] & valid[:, None, :]) | (k_idx == q_idx)[None]  # [B, T, S]
    return positions, mask[:, None]


def pads_last_layout(attention_mask):
    """attention_mask [B, S] of a whole-sequence forward (no cache) -> (unmasked, shift):
    unmasked: whether attention can run without a mask (every row's tokens are one contiguous run);
    shift [B]: each row's leading pads, to roll them behind its tokens (roll_rows), or None when no
    row starts with pads (or unmasked is False).

    Why: SDPA with a boolean mask cannot run FlashAttention; with is_causal and no mask it can.
    Plain causal attention is exact for the real tokens when every row's pads come AFTER its
    tokens: a token then sees exactly the real tokens at or before it, and the pads (unused
    outputs) influence no real token, in any layer. Rows padded on the left, as the trainer's
    (left-padded prompt + right-padded completion), are brought into that layout by rolling each
    row left by its leading pads; positions (RoPE) travel with the tokens, so nothing else
    changes. Rows with holes inside (1 0 1) have no such layout: they keep the mask. One host
    sync for both answers."""
    S = attention_mask.shape[1]
    valid = attention_mask.bool()
    lead = valid.int().argmax(-1)  # [B] first real token (0 for an all-pad row)
    n = valid.sum(-1)  # [B] real tokens
    idx = torch.arange(S, device=valid.device)
    run = (idx >= lead[:, None]) & (idx < (lead + n)[:, None])  # [B, S] one run from lead
    unmasked, any_lead = torch.stack([(valid == run).all(), (lead > 0).any()]).tolist()
    return unmasked, (lead if unmasked and any_lead else None)


def roll_rows(t, shift):
    """t [B, S, ...] -> out[b, i] = t[b, (i + shift[b]) % S]: row b rolled left by shift[b].
    roll_rows(roll_rows(t, s), -s) is t."""
    B, S = t.shape[:2]
    idx = (torch.arange(S, device=t.device) + shift[:, None]) % S  # [B, S]
    return t.gather(1, idx.view(B, S, *[1] * (t.dim() - 2)).expand_as(t))


class LMHead(nn.Linear):
    """The output projection [H] -> [V]. A few rows at a time (decoding) on CPU are computed
    as (W @ x^T)^T: MKL's small-M path for x @ W^T takes twice as long there (4 rows x 152064,
    BENCHMARKS.md). Being the module's own forward, ZeRO-3's hooks still gather the weight."""

    def forward(self, x):
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 16:
            return torch.mm(self.weight, x.t()).t().contiguous()  # [V, B] -> [B, V]
        return super().forward(x)


@dataclass
class MediaEmbeds:
    """One modality's tower outputs for a whole batch, to be written over its placeholder tokens.

    modality: "audio" (AudioEncoder output), "image" or "video" (VisionEncoder output); selects the
        placeholder id (cfg.audio_token_id / image_token_id / video_token_id).
    embeds [n, H]: one row per placeholder token, in the order the placeholders appear in the batch
        (row 0 first, then by position), i.e. the tower outputs of the batch's media concatenated in
        prompt order, as the processor orders them.
    deepstack: vision only, [n, H] per deepstack level k (released: 3, from vision blocks 8, 16, 24),
        added to the output of decoder layer k at these tokens. Empty for audio.
    """

    modality: str
    embeds: torch.Tensor
    deepstack: list[torch.Tensor] = field(default_factory=list)


@dataclass
class MediaInputs:
    """A batch's preprocessed media (media.py), before the towers: what the data layer hands the
    model. Each modality's items are concatenated in prompt order (batch row 0 first, then by
    position), the order their placeholder runs appear in input_ids.

    pixel_values [P_img, C*T*16*16] and image_grid_thw [n_img, 3]: all images' patches.
    pixel_values_videos [P_vid, C*T*16*16], video_grid_thw [n_vid, 3], video_second_per_grid [n_vid].
    input_features [128, sum(frames)] (all clips along time) and audio_feature_lens [n_audio] frames.
    use_audio_in_video: the videos' audio tracks are interleaved with their frames (one flag per
        batch, as transformers takes it).
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_second_per_grid: torch.Tensor | None = None
    input_features: torch.Tensor | None = None
    audio_feature_lens: torch.Tensor | None = None
    use_audio_in_video: bool = False

    def to(self, device) -> "MediaInputs":
        return MediaInputs(**{f.name: (v.to(device) if torch.is_tensor(v) else v)
                              for f in fields(self) for v in [getattr(self, f.name)]})


def media_rope_index(input_ids, attention_mask, cfg: ThinkerConfig, media: MediaInputs):
    """rope_index for a batch's MediaInputs: positions float32 [3, B, S] and rope_deltas [B, 1]."""
    counts = None if media.audio_feature_lens is None else \
        [audio_token_count(int(n)) for n in media.audio_feature_lens.tolist()]
    return rope_index(input_ids, attention_mask, cfg, image_grid_thw=media.image_grid_thw,
                      video_grid_thw=media.video_grid_thw, video_second_per_grid=media.video_second_per_grid,
                      audio_token_counts=counts, use_audio_in_video=media.use_audio_in_video)


MODALITIES = ("audio", "image", "video")  # the order transformers runs the towers in


def _present(media: MediaInputs | None) -> dict[str, bool]:
    if media is None:
        return dict.fromkeys(MODALITIES, False)
    return {"audio": media.input_features is not None, "image": media.pixel_values is not None,
            "video": media.pixel_values_videos is not None}


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        # the towers, only when the config carries them (ThinkerConfig.from_dict(..., towers=True));
        # their parameter names are the released ones after `thinker.`
        self.audio_tower = AudioEncoder(cfg.audio_config) if cfg.audio_config is not None else None
        self.visual = VisionEncoder(cfg.vision_config) if cfg.vision_config is not None else None
        self.gradient_checkpointing = False
        # SDPA without a mask (is_causal, pads last) for whole-sequence forwards; False keeps the
        # boolean mask everywhere (the reference the tests hold the unmasked path to)
        self.causal_without_mask = True

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, then refill what no checkpoint holds: the audio tower's sinusoid table (a
        non-persistent buffer), left uninitialised by a meta-device build."""
        super().to_empty(device=device, recurse=recurse)
        if self.audio_tower is not None:
            self.audio_tower.init_buffers()
        return self

    def encode_media(self, media: MediaInputs | None) -> list[MediaEmbeds]:
        """Run the towers over a batch's media: one MediaEmbeds per modality present, for `forward(media=...)`.

        As transformers: audio through the audio tower; images, then videos, each in its own
        vision-tower call. Run it once and pass the result to several forwards (teacher and student
        see the same tower outputs), except with LoRA on the towers (--freeze_vit false), where the
        teacher's come from a call under lora_disabled.

        Under ZeRO-3 with several ranks every rank must make the same tower calls, because each call
        gathers the tower's partitioned weights from all ranks. So there, every rank calls this as
        often as the others, also for a text-only batch (media None): the ranks agree on the
        modalities any of them has, and a rank without one runs that tower on a one-token stand-in
        whose output enters its result as a 0-row MediaEmbeds (still tied to the graph, so backward
        gathers match too). `forward` calls it by itself for a prompt given neither `media` nor
        `media_inputs`, so every rank may pass either media_inputs or nothing; a caller that runs
        encode_media itself does so on every rank and passes its result (a list, [] for no media).
        """
        have = _present(media)
        run, device = have, None
        if self._towers_partitioned():
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
            flags = torch.tensor([have[m] for m in MODALITIES], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            run = dict(zip(MODALITIES, map(bool, flags.tolist())))
        out = []
        for modality in (m for m in MODALITIES if run[m]):
            tower = self.audio_tower if modality == "audio" else self.visual
            if tower is None:
                raise ValueError(f"{modality} media, but this thinker was built without its "
                                 f"{'audio' if modality == 'audio' else 'vision'} tower (load it with towers=True)")
            c = tower.cfg
            if modality == "audio":
                features, lens = ((media.input_features, media.audio_feature_lens) if have[modality] else
                                  (torch.zeros(c.num_mel_bins, 1, device=device), torch.tensor([1])))  # -> 1 token
                embeds, deepstack = tower(features, lens), []
            else:
                pixels, grid = ((media.pixel_values, media.image_grid_thw) if modality == "image" else
                                (media.pixel_values_videos, media.video_grid_thw))
                if not have[modality]:  # one merge block of patches -> 1 token
                    m = c.spatial_merge_size
                    pixels = torch.zeros(m * m, c.in_channels * c.temporal_patch_size * c.patch_size ** 2,
                                         device=device)
                    grid = torch.tensor([[1, m, m]], device=device)
                embeds, deepstack = tower(pixels, grid)
            if not have[modality]:
                embeds, deepstack = embeds[:0], [d[:0] for d in deepstack]
            out.append(MediaEmbeds(modality, embeds, deepstack))
        return out

    def _towers_partitioned(self) -> bool:
        """Whether the towers' weights are ZeRO-3 partitions spread over several ranks."""
        towers = [t for t in (self.audio_tower, self.visual) if t is not None]
        return (bool(towers) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
                and any(hasattr(p, "ds_id") for t in towers for p in t.parameters()))

    def embed(self, input_ids, media=None):
        """input_ids [B, T] -> (inputs_embeds [B, T, H], deepstack).

        `media`: MediaEmbeds, at most one per modality (the towers' outputs; this is where the tower
        calls plug in). Each one's rows replace its placeholder tokens' embeddings, in order
        (transformers' masked_scatter). deepstack is None, or (visual_mask [B, T] bool, features:
        list of [n_visual, H]) with the image and video deepstack rows of each level merged in
        token order (the visual tokens are image AND video placeholders, never audio).
        """
        x = self.embed_tokens(input_ids)  # [B, T, H]; placeholders are embedded too, then overwritten
        if not media:
            return x, None
        masks, levels = {}, {}
        for m in media:
            if m.modality in masks:
                raise ValueError(f"{m.modality}: more than one MediaEmbeds; concatenate them in prompt order")
            token = self.cfg.placeholder_id(m.modality)
            mask = input_ids == token  # [B, T]
            n = int(mask.sum())
            if m.embeds.dim() != 2 or m.embeds.shape[0] != n or m.embeds.shape[1] != x.shape[-1]:
                raise ValueError(f"{m.modality}: {n} placeholder tokens (id {token}) in input_ids but embeds of "
                                 f"shape {tuple(m.embeds.shape)}, expected ({n}, {x.shape[-1]})")
            x = x.masked_scatter(mask[..., None], m.embeds.to(x.dtype))
            masks[m.modality] = mask
            if m.deepstack:
                if m.modality == "audio":
                    raise ValueError("audio: deepstack features are vision-only (image and video)")
                for k, f in enumerate(m.deepstack):
                    if tuple(f.shape) != tuple(m.embeds.shape):
                        raise ValueError(f"{m.modality}: deepstack level {k} has shape {tuple(f.shape)}, "
                                         f"expected {tuple(m.embeds.shape)}")
                levels[m.modality] = list(m.deepstack)
        if not levels:
            return x, None
        if len({len(v) for v in levels.values()}) > 1:
            raise ValueError(f"deepstack: different numbers of levels per modality "
                             f"{ {k: len(v) for k, v in levels.items()} }")
        if len(levels) == 1:
            kind, feats = next(iter(levels.items()))
            return x, (masks[kind], feats)
        visual = torch.zeros_like(next(iter(masks.values())))
        for kind in levels:
            visual |= masks[kind]
        joint = []  # per level: every visual token's row, in token order (transformers' embed_joint)
        for k in range(len(next(iter(levels.values())))):
            f = x.new_zeros(int(visual.sum()), x.shape[-1], dtype=levels["image"][k].dtype)
            for kind, feats in levels.items():
                f[masks[kind][visual]] = feats[k]
            joint.append(f)
        return x, (visual, joint)

    def resolve_media(self, input_ids, attention_mask, media_inputs: MediaInputs, media=None, position_ids=None):
        """(media, position_ids) for a forward over input_ids [B, T]: the given ones, else the towers'
        outputs (encode_media) and, with images or videos, rope_index's positions [3, B, T]. Text and
        audio-only batches keep position_ids None: 1-D positions from the mask, as transformers."""
        if media is None:
            media = self.encode_media(media_inputs)
        if position_ids is None and (media_inputs.image_grid_thw is not None
                                     or media_inputs.video_grid_thw is not None):
            position_ids = media_rope_index(input_ids, attention_mask, self.cfg, media_inputs)[0]
        return media, position_ids

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, return_hidden: bool = False,
                media=None, position_ids=None, media_inputs: MediaInputs | None = None):
        """input_ids [B, T] (the new tokens when decoding with `cache`); attention_mask [B, S]
        covers cached + new tokens. Returns logits [B, T, V], or the final normed hidden
        states [B, T, H] with `return_hidden` (the trainer projects only the positions it scores).

        Media: `media_inputs` (the batch's MediaInputs) runs the towers (encode_media) and, for
        images and videos, computes the MRoPE positions with rope_index over the whole sequence
        passed (a prompt, or prompt + completion in training). Either part can be given instead:
        `media`, a list of MediaEmbeds (tower outputs for the placeholder tokens, see `embed`; e.g.
        encode_media's result reused for teacher and student), and `position_ids` [3, B, T], the
        MRoPE positions of the new tokens (float or int). Without position_ids, positions are 1-D
        from the mask: right for text and audio-only prompts, so image/video media require them.
        position_ids [B, T] is accepted too (1-D RoPE at those positions). With towers partitioned
        over several ZeRO-3 ranks, a prompt given neither media nor media_inputs still joins the
        other ranks' tower calls (encode_media explains why)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if media is None and media_inputs is None and not past and self._towers_partitioned():
            media_inputs = MediaInputs()  # a prompt without media still joins the other ranks' tower calls
        if media_inputs is not None:
            if past:
                raise ValueError("media_inputs belong to the whole prompt (the prefill), not to a decode step")
            media, position_ids = self.resolve_media(input_ids, attention_mask, media_inputs, media, position_ids)
        x, deepstack = self.embed(input_ids, media)  # [B, T, H]
        # whole-sequence forwards (training, scoring) run attention without a mask, pads last (see
        # pads_last_layout); decoding with the cache keeps the boolean mask over the cache
        unmasked, shift = (pads_last_layout(attention_mask) if cache is None and self.causal_without_mask
                           else (False, None))
        positions, mask = positions_and_mask(attention_mask, T, with_mask=not unmasked)
        if position_ids is None:
            if any(m.modality in ("image", "video") and len(m.embeds) for m in media or ()):
                raise ValueError("image/video media need 3-D position_ids [3, B, T] (see rope_index)")
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        elif position_ids.shape == (B, T):
            cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        elif position_ids.shape == (3, B, T):
            cos, sin = mrope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section,
                                     x.dtype)
        else:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(3, B, T)}")
        if shift is not None:  # left pads: move them behind the tokens
            x, cos, sin = roll_rows(x, shift), roll_rows(cos, shift), roll_rows(sin, shift)
            if deepstack is not None:  # visual tokens keep their order: they are real tokens
                deepstack = (roll_rows(deepstack[0], shift), deepstack[1])
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
            if deepstack is not None and i < len(deepstack[1]):
                # DeepStack: the vision tower's intermediate features join the first layers' outputs
                visual, feats = deepstack
                x = x.index_put((visual,), x[visual] + feats[i].to(x.dtype))
        if shift is not None:
            x = roll_rows(x, -shift)  # back to the caller's layout
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
# The towers' tensors: released `thinker.audio_tower.*` / `thinker.visual.*`, a thinker-only save
# `audio_tower.*` / `visual.*`, transformers 5's in-memory names with `model.` in front. Our
# parameter names are the part after `thinker.` (so checked before the text prefixes).
_TOWER_PREFIXES = tuple((f"{outer}{tower}.", f"{tower}.") for tower in ("audio_tower", "visual")
                        for outer in ("thinker.model.", "thinker.", "model.", ""))
_LM_HEAD_KEYS = ("thinker.lm_head.weight", "lm_head.weight")
_PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _target(key: str):
    """Checkpoint key -> (our parameter name, index into it or None), or None if not a thinker tensor
    (talker, code2wav). Tower tensors map to `audio_tower.*` / `visual.*`."""
    if key in _LM_HEAD_KEYS:
        return "lm_head.weight", None
    for prefix, ours in _TOWER_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):], None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix):]
            break
    else:
        return None  # talker, code2wav
    m = _PER_EXPERT.match(name)
    if m is None:
        return name, None
    stem, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return f"{stem}.down_proj", (e,)
    half = 0 if proj == "gate_proj" else 1  # gate rows first, then up rows
    return f"{stem}.gate_up_proj", (e, half)


def _tower_of(name: str) -> str | None:
    """'audio_tower' / 'visual' for one of the towers' parameter names, else None."""
    head = name.split(".", 1)[0]
    return head if head in ("audio_tower", "visual") else None


def _holds(model: Thinker, key: str) -> bool:
    """Whether `model` has a place for this checkpoint tensor (a text-only model skips the towers')."""
    target = _target(key)
    if target is None:
        return False
    tower = _tower_of(target[0])
    return tower is None or getattr(model, tower) is not None


def other_tensors(path: str, model: Thinker):
    """(key, tensor) pairs of everything in a checkpoint that `model` does not hold (the towers it
    was built without, talker, code2wav), read one at a time."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for key, shard in _shard_map(path).items():
        if not _holds(model, key):
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


def zero3_slice(param: nn.Parameter) -> slice:
    """The part of the flattened tensor that this rank's ZeRO-3 partition holds. DeepSpeed's default
    partitioning: equal flat slices in global rank order, the last one padded (so a slice may be
    shorter than the partition, or empty)."""
    start = param.ds_tensor.ds_numel * torch.distributed.get_rank()
    return slice(start, max(start, min(start + param.ds_tensor.ds_numel, param.ds_numel)))


def held_here(param: nn.Parameter) -> torch.Tensor:
    """What this process holds of a parameter: its ZeRO-3 partition (padding excluded), else the tensor."""
    if not hasattr(param, "ds_tensor"):
        return param.data
    part = zero3_slice(param)
    return param.ds_tensor.data[:part.stop - part.start]


def part_of(param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """The part of `value` (a whole tensor of `param`'s shape) that belongs in held_here(param): the
    ZeRO-3 slice of the flattened tensor, so no rank ever holds more than the tensor being loaded."""
    return value.reshape(-1)[zero3_slice(param)] if hasattr(param, "ds_tensor") else value


CHECKSUM_MOD = (1 << 31) - 1  # a prime: every position weight and word is invertible modulo it


def checksum(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """An exact checksum of a tensor's bits: each 16- or 32-bit word weighted by its position, summed
    modulo a prime (Fletcher-style, so a changed, moved or missing element shows). Integer sums do not
    depend on reduction order, so the CPU and any GPU agree on it; memory stays at `chunk` int64s."""
    words = t.detach().reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()])
    block, unsigned = 1 << 15, (1 << 8 * t.element_size()) - 1
    total = 0
    for first in range(0, words.numel(), chunk):  # chunk is a multiple of block
        w = words[first:first + chunk].long() & unsigned  # [n] words < 2^32
        w = F.pad(w, (0, -w.numel() % block)).view(-1, block)  # [blocks, 2^15]
        within = (w * torch.arange(1, block + 1, device=w.device)).sum(1) % CHECKSUM_MOD  # sums < 2^62
        index = torch.arange(first // block + 1, first // block + 1 + w.shape[0], device=w.device)
        total += int((within * index % CHECKSUM_MOD).sum())
    return total % CHECKSUM_MOD


def load_weights(model: Thinker, path: str, assign=copy_into_param):
    """Stream the thinker's tensors of a checkpoint into `model`, shard by shard: the language
    model's, and the towers' when `model` has them (a text-only model skips theirs).

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
        if _holds(model, key):
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


def load_thinker(path: str, dtype=torch.bfloat16, device="cpu", towers: bool = False) -> Thinker:
    """Build the thinker without initialising it (meta device) and stream the checkpoint in:
    the only full copy of the weights is the model itself. towers=True: with its audio and
    vision towers (for media); without, exactly the language model."""
    dtype = resolve_dtype(dtype)
    cfg = ThinkerConfig.from_pretrained(path, towers=towers)
    with torch.device("meta"):
        model = Thinker(cfg).to(dtype)
    model.to_empty(device=device)
    load_weights(model, path)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint in the released layout (merged exports; tiny.py's random checkpoints)


def released_tensors(named, prefix: str = "thinker."):
    """(our name, tensor) pairs -> (released key, tensor) pairs, experts split per expert."""
    for name, p in named:
        if name == "lm_head.weight" or _tower_of(name) is not None:  # thinker.lm_head, thinker.audio_tower.*, ...
            yield f"{prefix}{name}", p
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


# Top-level ids of the released config.json that the thinker never reads (the talker and chat
# tooling do); written so that a config we generate has every field the released one has.
_RELEASED_IDS = {"im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948,
                 "user_token_id": 872, "assistant_token_id": 77091, "tts_pad_token_id": 151671,
                 "tts_bos_token_id": 151672, "tts_eos_token_id": 151673}


def released_config(cfg: ThinkerConfig, dtype=torch.bfloat16) -> dict:
    """config.json with the released fields for what `cfg` describes: the thinker's text_config, ids and
    timing, its towers' audio_config / vision_config when cfg has them, and no talker
    (enable_audio_output false: speech output is not part of what selfkd trains)."""
    dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
    thinker = {"model_type": "qwen3_omni_moe_thinker", **cfg.to_hf_thinker_ids(),
               "seconds_per_chunk": 2, "user_token_id": 872, "initializer_range": 0.02,
               "tie_word_embeddings": cfg.tie_word_embeddings, "dtype": dtype,
               "text_config": cfg.to_hf_text_config()}
    if cfg.audio_config is not None:
        thinker["audio_config"] = cfg.audio_config.to_hf_dict()
    if cfg.vision_config is not None:
        thinker["vision_config"] = cfg.vision_config.to_hf_dict()
    return {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
            "enable_audio_output": False, **_RELEASED_IDS, "initializer_range": 0.02, "dtype": dtype,
            "thinker_config": thinker}


def save_released(cfg: ThinkerConfig, named, path: str, dtype=torch.bfloat16, max_shard_bytes: int = 2 * 2**30,
                  extra=(), config: dict | None = None):
    """Write (our name, tensor) pairs as config.json + sharded safetensors + index in the released
    layout. Tensors are consumed one at a time; at most one shard is held in memory. `extra`
    yields (released key, tensor) pairs written as they are (e.g. a base model's talker, or the
    towers of a text-only model); `config` replaces the generated config.json (released_config)."""
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
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or released_config(cfg, dtype), f, indent=2)


# ----------------------------------------------------------------------------------------------
# Decoding


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. [B, V] -> [B, V]

    Same semantics as transformers' TopKLogitsWarper then TopPLogitsWarper with
    min_tokens_to_keep=1 (ties with the k-th logit are kept; the nucleus is the smallest set
    whose mass reaches top_p).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)  # [B, V] ascending
        mass_below = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop = mass_below <= 1 - top_p  # the tail holding at most 1 - top_p of the mass
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """Next token ids [B] from logits [B, V].

    temperature 0 or None: greedy argmax. Otherwise divide by the temperature (in fp32),
    filter (top-k, then top-p) and draw by inverting the CDF with one uniform per row from
    `generator` (torch.multinomial draws one random number per vocabulary entry: 152064 per
    row per decode step).
    """
    if not temperature:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # [B, V]
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # [B, 1]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index whose cdf exceeds u
    return ids.clamp(max=cdf.shape[-1] - 1)  # [B]


def greedy(logits):
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate(model: Thinker, prompt_ids, prompt_mask, max_new_tokens: int, eos_ids, pad_id: int,
             pick_next=greedy, all_done=None, media=None, position_ids=None,
             media_inputs: MediaInputs | None = None):
    """KV-cache decoding from left-padded prompts [B, P].

    Media prompts: `media_inputs` (the prompts' MediaInputs; the towers run once, positions from
    rope_index), or their parts `media` (MediaEmbeds list) and `position_ids` [3, B, P], go to the
    prefill; each generated token then takes the previous position + 1 on all three axes (the
    prompt's last position + 1 + i for the i-th, as transformers' generate does). That is
    cumsum(mask) - 1 + rope_delta whenever the prompt's last token holds the row's largest
    position, i.e. prompts ending in text, except after the audio-in-video case noted at rope_index.
    Text and audio-only prompts without position_ids: the unchanged 1-D path.

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
    if media_inputs is not None:
        media, position_ids = model.resolve_media(prompt_ids, prompt_mask, media_inputs, media, position_ids)

    def next_logits(ids, **media_kw):  # only the last position needs logits: [B, V], not [B, T, V]
        return model.lm_head(model(ids, mask, cache, return_hidden=True, **media_kw)[:, -1])

    prefill = {k: v for k, v in (("media", media), ("position_ids", position_ids)) if v is not None}
    logits = next_logits(prompt_ids, **prefill)
    step_pos = None if position_ids is None else position_ids[..., -1:]  # [3, B, 1] (or [B, 1])
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
        if step_pos is None:
            logits = next_logits(tokens[-1][:, None])
        else:
            step_pos = step_pos + 1
            logits = next_logits(tokens[-1][:, None], position_ids=step_pos)
    return torch.stack(tokens, 1), torch.stack(alive, 1).long()
