"""The Qwen3-Omni-30B-A3B thinker's language model in plain PyTorch: text, and the language-model
side of audio/image/video prompts.

Read top to bottom: config -> building blocks (RMSNorm, RoPE and MRoPE, attention with its KV cache,
grouped MoE) -> the Thinker (with MediaEmbeds, and the towers of towers.py when a run has media).
Beside it: positions.py (the 3-D positions of media prompts), weights.py (the released safetensors
checkpoint, in and out), generate.py (decoding).

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

import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from positions import rope_index
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


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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


class CacheSlot:
    """One decode step's view of a KVCache: k, v [B, kvH, 1, D] go to position `index` ([1] long,
    on the device); attention reads the whole cache [B, kvH, max_len, D] under a mask of what is
    written. Every step has the same shapes and no Python integer: one compiled graph serves all."""

    def __init__(self, cache: KVCache, index):
        self.cache, self.index = cache, index

    def update(self, layer: int, k, v):
        self.cache.k[layer].index_copy_(2, self.index, k)
        self.cache.v[layer].index_copy_(2, self.index, v)
        return self.cache.k[layer], self.cache.v[layer]


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
        if T == 1 and mask is not None:  # a decode step: each kv head's query heads as its rows, so no
            # kernel copies k and v per query head (a GPU's masked GQA does: simulate.py measured it)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.reshape(B, self.n_heads, T, -1).transpose(1, 2).reshape(B, T, -1))


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
    A third way serves a few tokens at a time (decoding), where neither pays: `forward_routed`.
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

    # -- a few tokens (decoding): each row times its own experts' weights, indexed out of the stacks

    def forward_routed(self, x, expert_ids):
        """x [N, H], expert_ids [N, K] -> [N, K, H]: each token through each of its K experts.
        Reads only the routed experts' weights (a copy of them: the stacks indexed by the ids),
        in ~5 ops whatever the expert count, with no host sync and shapes fixed by N: what a
        decode step wants, and what torch.compile can capture (the loop's counts cannot be traced,
        grouped_mm's kernels take bf16 only). SparseMoE takes it without gradients when N * K <= E
        and the grouped path does not pay."""
        x = x[:, None].expand(-1, expert_ids.shape[1], -1)  # [N, K, H]: a view
        gate, up = self.routed_project(x, expert_ids, "gate_up_proj").chunk(2, dim=-1)  # [N, K, I] each
        return self.routed_project(F.silu(gate) * up, expert_ids, "down_proj")  # [N, K, H]

    def routed_project(self, x, ids, which: str):
        # x [N, K, in], row (n, k) times expert ids[n, k]'s [out, in]^T -> [N, K, out]
        return torch.einsum("nki,nkoi->nko", x, getattr(self, which)[ids])


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
        if (not torch.is_grad_enabled() and x.shape[0] * self.top_k <= self.experts.num_experts
                and not self.experts.use_grouped(x)):
            # a few tokens without gradients (a decode step): each through its own experts, the
            # others not read (with gradients, the copies of the routed weights would be kept)
            y = self.experts.forward_routed(x, expert_ids)  # [N, K, H]
            return (y * weights[..., None]).sum(dim=1).view(B, T, H)
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
    """The output projection [H] -> [V]. Decoding on CPU (a few fp32 rows, no gradient) reads the
    152064 x H weight once per token, most of a decode step: there MKL's GEMM runs on a copy packed
    for that row count (torch.ops.mkl, as inductor does for frozen weights), ~1.8x faster at 4 rows
    (BENCHMARKS.md H); made again when the weight's storage, version or the row count changes.
    Being the module's own forward, ZeRO-3's hooks still gather the weight."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 16 and x.dtype == self.weight.dtype
                == torch.float32 and not (torch.is_grad_enabled() and self.weight.requires_grad)
                and torch.backends.mkl.is_available()):
            return torch.ops.mkl._mkl_linear(x, self.packed(x.shape[0]), self.weight, None, x.shape[0])
        return super().forward(x)

    @torch.compiler.disable
    def packed(self, rows: int):
        key = (rows, self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = None  # the old copy goes before the new one is made
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
            self._packed_key = key
        return self._packed


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

    def decode_step(self, ids, positions, cache: KVCache, index, key_valid):
        """One token per row after a prefill, in static shapes: generate.py's decoding loop calls
        it (compiled with --compile_decode). ids [B, 1]; positions [B, 1], or [3, B, 1] for MRoPE;
        index [1] long: the cache position the token is written to; key_valid [B, max_len] bool,
        the cache positions that hold a real token, updated here for this one.

        The same arithmetic as forward(ids, mask, cache) at that point, but attention reads the
        whole cache under the key_valid mask instead of a slice as long as the tokens so far.
        Returns the last hidden states [B, H], normed: the caller applies lm_head (on CPU a packed
        MKL kernel that torch.compile leaves alone)."""
        key_valid.index_fill_(1, index, True)
        x = self.embed_tokens(ids)  # [B, 1, H]
        if positions.dim() == 3:
            cos, sin = mrope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section, x.dtype)
        else:
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask, slot = key_valid[:, None, None, :], CacheSlot(cache, index)  # [B, 1, 1, max_len]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slot)
        return self.norm(x[:, -1])  # [B, H]
