"""LoRA that can be switched off: the student is base + LoRA, the teacher is the same base with
LoRA switched off (`lora_disabled`). One copy of the 30B weights serves both.

    y = x W^T + scaling * dropout(x) A^T B^T        scaling = alpha / rank, B = 0 at init

Targets (`--lora_target_modules`):
    ALL          every linear map of the thinker except lm_head and the MoE router:
                 self_attn.{q,k,v,o}_proj, each expert's fused gate|up projection and its down
                 projection, and {gate,up,down}_proj of dense MLP layers (none in the released model)
    a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (dense MLP
                 layers) and `experts` (every expert's gate|up and down projections)

Experts keep their weights stacked ([E, out, in]) and so does their LoRA: A [E, r, in],
B [E, out, r], applied inside the grouped expert loop to the tokens routed to each expert.
One naming scheme: a LoRA parameter is `<linear>.lora.A|B` (e.g. `self_attn.q_proj.lora.A`) or
`<experts>.lora.<stacked weight>.A|B` (e.g. `mlp.experts.lora.gate_up_proj.B`); `.lora.` in a
name marks exactly the trainable parameters.
The expert gate and up projections are one fused map ([E, 2*I, H], gate rows first, as in
transformers 5 and PEFT), so they share one LoRA pair; this is exactly PEFT's
`target_parameters` LoRA on `experts.gate_up_proj`, which makes the adapter loadable by PEFT.

The audio and vision towers are frozen and get no LoRA by default (ms-swift's --freeze_vit true,
--freeze_aligner true). ms-swift's split of the towers is kept:
    vit          every linear map of audio_tower and visual except the aligners (attention, MLP,
                 the audio conv_out); LoRA on them with freeze_vit=False
    aligner      what projects tower features to the LM width: audio_tower.proj1/proj2,
                 visual.merger and the deepstack visual.merger_list; LoRA with freeze_aligner=False
(convolutions, the vision patch embedding and position table never get LoRA, as in ms-swift,
whose LoRA targets linear layers only.) With LoRA on a tower the teacher (LoRA off) and the
student see different tower outputs, as they should.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_qwen3omni import Attention, Experts, MLP, Thinker, grouped_mm
from weights import other_tensors, save_released

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = LINEAR_TARGETS + ("experts",)
# ms-swift's `aligner` modules of qwen3_omni (its model_arch): module-name prefixes inside the thinker
ALIGNER_PREFIXES = ("audio_tower.proj1", "audio_tower.proj2", "visual.merger.", "visual.merger_list.")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# what PEFT's config cannot hold (the training dropout of expert LoRA, the tower flags), beside it
ADAPTER_EXTRAS = "selfkd_adapter.json"


# ----------------------------------------------------------------------------------------------
# Layers


def _init_lora_A_(A: torch.Tensor, generator=None):
    """PEFT's default: kaiming_uniform_(a=sqrt(5)) on each [r, in] matrix, i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    with torch.no_grad():
        A.uniform_(-bound, bound, generator=generator)


class LoRABranch(nn.Module):
    """The low-rank path of one linear map. Its own module so that, under ZeRO-3, its weights are
    gathered only when it runs: with LoRA switched off it is never called and never gathered."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float, generator=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        _init_lora_A_(self.A, generator)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return (self.dropout(x) @ self.A.T) @ self.B.T * self.scaling

    def delta_weight(self):  # [out, in]
        return (self.B.float() @ self.A.float()) * self.scaling


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias`, same names) plus a switchable LoRA branch."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator=None):
        nn.Module.__init__(self)  # reuse base's weight and bias instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the LM's have no bias, the towers' do
        self.lora = LoRABranch(self.in_features, self.out_features, rank, alpha, dropout, generator)
        self.lora_enabled, self.merged = True, False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled and not self.merged:
            y = y + self.lora(x.to(self.lora.A.dtype)).to(y.dtype)
        return y


class StackedLoRA(nn.Module):
    """The low-rank path of a stack of E linear maps (one per expert): A [E, r, in], B [E, out, r].
    Experts keep their weights stacked and so does their LoRA; the stacks are read inside the
    experts' forward (expert e's rows times A[e]^T B[e]^T), not called as a module."""

    def __init__(self, num: int, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 generator=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(num, rank, in_features))
        self.B = nn.Parameter(torch.zeros(num, out_features, rank))
        _init_lora_A_(self.A, generator)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def delta_weight(self):  # [E, out, in]
        return torch.bmm(self.B.float(), self.A.float()) * self.scaling


class LoRAExperts(Experts):
    """Stacked experts with per-expert LoRA on the fused gate|up and on the down projections,
    `lora[which]` for `which` in gate_up_proj, down_proj (the stacked weight it adapts).

    Every expert path of Experts gets the delta: `project` inside the per-expert loop (the spec),
    `grouped_project` as two more grouped matmuls per projection (x A^T, then B^T), so LoRA adds
    4 grouped kernels per pass instead of ~6 ops per expert, and `routed_project` (decoding) from
    the A and B stacks indexed like the weights. With dropout the paths draw different masks
    (the loop per expert, the others once over all rows): same distribution, other random numbers."""

    def __init__(self, base: Experts, rank: int, alpha: float, dropout: float, generator=None):
        nn.Module.__init__(self)
        self.num_experts, self.hidden, self.inter = base.num_experts, base.hidden, base.inter
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        E, H, I = self.num_experts, self.hidden, self.inter
        self.lora = nn.ModuleDict({  # gate_up first: A is drawn in this order
            "gate_up_proj": StackedLoRA(E, H, 2 * I, rank, alpha, dropout, generator),
            "down_proj": StackedLoRA(E, I, H, rank, alpha, dropout, generator)})
        self.lora_enabled, self.merged = True, False
        self.grouped = base.grouped

    def lora_on(self) -> bool:
        return self.lora_enabled and not self.merged

    def matrices(self) -> list[torch.Tensor]:
        lora = [t for branch in self.lora.values() for t in (branch.A, branch.B)]
        return super().matrices() + (lora if self.lora_on() else [])

    def per_expert(self) -> dict:
        w = super().per_expert()
        if self.lora_on():  # switched off: the LoRA stacks are not touched
            for which, branch in self.lora.items():
                w[which, "A"], w[which, "B"] = branch.A.unbind(0), branch.B.unbind(0)
        return w

    def project(self, x, e: int, which: str, w: dict):
        y = x @ w[which][e].T
        if self.lora_on():
            branch, A, B = self.lora[which], w[which, "A"][e], w[which, "B"][e]
            y = y + ((branch.dropout(x.to(A.dtype)) @ A.T) @ B.T * branch.scaling).to(y.dtype)
        return y

    def grouped_project(self, x, which: str, offsets, counts):
        y = super().grouped_project(x, which, offsets, counts)  # [S, out]
        if self.lora_on():
            branch = self.lora[which]
            At, Bt = branch.A.transpose(1, 2), branch.B.transpose(1, 2)  # [E, in, r], [E, r, out]: views
            trained = [t for t in (At, Bt) if t.requires_grad]  # none under no_grad or when frozen
            if trained:
                unused = (counts == 0).view(-1, 1, 1)  # [E, 1, 1] experts without rows
                for t in trained:
                    t.register_hook(partial(_zero_unused_experts, unused))
            h = grouped_mm(branch.dropout(x.to(At.dtype)), At, offsets)  # [S, r]
            y = y + (grouped_mm(h, Bt, offsets) * branch.scaling).to(y.dtype)
        return y

    def routed_project(self, x, ids, which: str):
        y = super().routed_project(x, ids, which)  # [N, K, out]
        if self.lora_on():
            branch = self.lora[which]
            h = torch.einsum("nki,nkri->nkr", branch.dropout(x.to(branch.A.dtype)), branch.A[ids])  # [N, K, r]
            y = y + (torch.einsum("nkr,nkor->nko", h, branch.B[ids]) * branch.scaling).to(y.dtype)
        return y


def _zero_unused_experts(unused, grad):
    """The LoRA gradient of an expert that got no rows is 0, and is made so here: torch's grouped
    kernel leaves those slices to the kernel, and on B200 (sm100) it has written garbage there
    (pytorch/pytorch#172439). A fill, not a multiply: garbage may be NaN. grad [E, in, out]."""
    return grad.masked_fill(unused, 0)


# ----------------------------------------------------------------------------------------------
# Injection


@dataclass
class LoraSummary:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    wrapped: int  # modules that got LoRA
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self):  # targets: the LM's, then "vit" / "aligner" when the towers have LoRA
        return (f"LoRA r={self.rank} alpha={self.alpha:g} dropout={self.dropout:g} on {', '.join(self.targets)} "
                f"({self.wrapped} modules): trainable {self.trainable:,} / {self.total:,} params "
                f"({self.percent:.4f}%)")


def parse_targets(targets: str) -> tuple[str, ...]:
    if targets.strip().upper() in ("ALL", "ALL-LINEAR"):
        return ALL_TARGETS
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora_target_modules {targets!r}: unknown target(s) {unknown}; "
                         f"use ALL or a comma list of {', '.join(ALL_TARGETS)}")
    return names


def lora_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def tower_part(name: str) -> str | None:
    """'vit' or 'aligner' for a module of the towers (by its name in the thinker), None for the LM's."""
    if not name.startswith(("audio_tower.", "visual.")):
        return None
    return "aligner" if name.startswith(ALIGNER_PREFIXES) else "vit"


def inject_lora(model: Thinker, rank: int = 8, alpha: float = 16, dropout: float = 0.05, targets: str = "ALL",
                seed: int = 0, freeze_vit: bool = True, freeze_aligner: bool = True) -> LoraSummary:
    """Add LoRA to `model` in place, freeze everything else. A is drawn from `seed` (the same on
    every rank), B is zero, so the student starts exactly equal to the base.

    `targets` names the language model's layers. freeze_vit=False adds LoRA to every linear map
    of the towers outside the aligners, freeze_aligner=False to the aligners' (ms-swift's flags;
    a model built without towers has none to add)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    names = parse_targets(targets)
    tower_parts = {part for part, frozen in (("vit", freeze_vit), ("aligner", freeze_aligner)) if not frozen}
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):  # the language model (the towers hold no Attention / MLP / Experts)
        if isinstance(parent, (Attention, MLP)):
            for child in LINEAR_TARGETS:
                base = getattr(parent, child, None)
                if child in names and isinstance(base, nn.Linear) and not isinstance(base, LoRALinear):
                    setattr(parent, child, LoRALinear(base, rank, alpha, dropout, generator).to(base.weight.device))
                    wrapped += 1
        elif "experts" in names and type(getattr(parent, "experts", None)) is Experts:
            base = parent.experts
            parent.experts = LoRAExperts(base, rank, alpha, dropout, generator).to(base.gate_up_proj.device)
            wrapped += 1
    tower_linears = [(name, m) for name, m in model.named_modules()
                     if tower_part(name) in tower_parts and type(m) is nn.Linear]
    for name, base in tower_linears:
        parent, child = name.rsplit(".", 1)
        lora = LoRALinear(base, rank, alpha, dropout, generator).to(base.weight.device)
        setattr(model.get_submodule(parent), child, lora)
        wrapped += 1
    if wrapped == 0:
        raise ValueError(f"--lora_target_modules {targets!r} matched no module of this model")
    trainable = sum(p.numel() for n, p in model.named_parameters() if _is_lora_name(n))
    for n, p in model.named_parameters():
        p.requires_grad_(_is_lora_name(n))
    total = sum(_numel(p) for p in model.parameters())
    on_towers = tuple(part for part in ("vit", "aligner") if part in tower_parts and
                      any(tower_part(n) == part for n, _ in tower_linears))
    return LoraSummary(rank, alpha, dropout, names + on_towers, wrapped, trainable, total)


def _numel(p):
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _shape(p) -> tuple:
    """The full shape, also of a ZeRO-3-partitioned parameter (whose .shape is empty)."""
    return tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def _is_lora_name(name: str) -> bool:
    return ".lora." in name


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if _is_lora_name(n)]


@contextmanager
def lora_disabled(model: nn.Module):
    """Under this context the model computes exactly the base model: every LoRA branch is
    skipped (not run, not gathered). Nesting is safe: each exit restores what it found."""
    modules = lora_modules(model)
    if any(m.merged for m in modules):
        raise RuntimeError("lora_disabled: LoRA is merged into the base weights; call unmerge_lora first")
    before = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, before):
            m.lora_enabled = state


# ----------------------------------------------------------------------------------------------
# Merging


def _merge(model: nn.Module, sign: float, want_merged: bool):
    with torch.no_grad():
        for m in lora_modules(model):
            if m.merged == want_merged:
                continue
            if isinstance(m, LoRALinear):
                m.weight.add_((sign * m.lora.delta_weight()).to(m.weight.dtype))
            else:
                for which, branch in m.lora.items():
                    w = getattr(m, which)
                    w.add_((sign * branch.delta_weight()).to(w.dtype))
            m.merged = want_merged


def merge_lora(model: nn.Module):
    """Fold LoRA into the base weights (fast inference). Exact in fp32; in bf16 the merged
    weights are rounded, so unmerge_lora gives the base back only up to that rounding."""
    _merge(model, 1.0, True)


def unmerge_lora(model: nn.Module):
    _merge(model, -1.0, False)


def merged_state(model: Thinker):
    """(name, tensor) pairs of the base weights with LoRA folded in, one tensor at a time, without
    touching the model; names are the plain thinker's."""
    owners = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            owners[f"{name}.weight"] = (m, None)
        elif isinstance(m, LoRAExperts):
            owners[f"{name}.gate_up_proj"] = (m, "gate_up_proj")
            owners[f"{name}.down_proj"] = (m, "down_proj")
    for name, p in model.named_parameters():
        if _is_lora_name(name):
            continue
        m, which = owners.get(name, (None, None))
        if m is None or m.merged:
            yield name, p.detach()
        else:
            delta = (m.lora if which is None else m.lora[which]).delta_weight()
            yield name, (p.detach().float() + delta).to(p.dtype)


def export_merged(model: Thinker, path: str, dtype=torch.bfloat16, base_path: str | None = None):
    """Write base + LoRA as a plain checkpoint in the released layout, which transformers loads.
    With `base_path` (the model LoRA was trained on) the export is the complete model: its
    config.json, its tokenizer files and its audio/vision/talker tensors are carried over."""
    config, extra = None, ()
    if base_path is not None:
        with open(os.path.join(base_path, "config.json")) as f:
            config = json.load(f)
        extra = other_tensors(base_path, model)
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(base_path):
            if name not in ("config.json", "model.safetensors.index.json") and not name.endswith(".safetensors"):
                src = os.path.join(base_path, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(path, name))
    save_released(model.cfg, merged_state(model), path, dtype=dtype, extra=extra, config=config)


# ----------------------------------------------------------------------------------------------
# Adapter files: PEFT's layout for transformers' Qwen3OmniMoeThinkerForConditionalGeneration

# transformers' Qwen3OmniMoeThinkerForConditionalGeneration holds the LM under `model.language_model.`
# and the towers under `model.audio_tower.` / `model.visual.`; PEFT keys add `base_model.model.`.
_PEFT_PREFIX = "base_model.model."


def _hf_name(name: str) -> str:
    """Our module name -> transformers' module name in the thinker (what PEFT keys and matches)."""
    return f"model.{name}" if tower_part(name) else f"model.language_model.{name}"


# The towers' LoRA modules as PEFT regexes over transformers' names (must select exactly the
# nn.Linear modules tower_part classifies; the PEFT round-trip test checks the key sets match)
_TOWER_REGEX = {
    "vit": r"audio_tower\.(conv_out|layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2))"
           r"|visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])",
    "aligner": r"audio_tower\.proj[12]|visual\.(merger|merger_list\.\d+)\.mlp\.[02]",
}


def _peft_entries(model: Thinker):
    """(peft key, our parameter, to_peft, from_peft) for every LoRA tensor.

    PEFT stores a Linear's LoRA as lora_A.weight [r, in] and lora_B.weight [out, r] (ours too).
    For stacked experts (`target_parameters`) it uses one Linear over all experts:
    lora_A.weight [E*r, in] (expert-major) and lora_B.weight [out, r*E] (rank-major), and when
    two parameters of the experts module are targeted the first one sits under `base_layer.`.
    """
    entries = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for ab in ("A", "B"):
                p = getattr(m.lora, ab)
                entries.append((f"{_PEFT_PREFIX}{_hf_name(name)}.lora_{ab}.weight", p, lambda t: t, lambda t: t))
        elif isinstance(m, LoRAExperts):
            for which, sub in (("gate_up_proj", "base_layer."), ("down_proj", "")):
                A, B = m.lora[which].A, m.lora[which].B
                E, r = _shape(A)[0], _shape(A)[1]
                stem = f"{_PEFT_PREFIX}{_hf_name(name)}.{sub}"
                entries.append((stem + "lora_A.weight", A,
                                lambda t: t.reshape(-1, t.shape[-1]),  # [E, r, in] -> [E*r, in]
                                lambda t, E=E, r=r: t.reshape(E, r, -1)))
                entries.append((stem + "lora_B.weight", B,
                                lambda t: t.permute(1, 2, 0).reshape(t.shape[1], -1),  # [E, out, r] -> [out, r*E]
                                lambda t, E=E, r=r: t.reshape(t.shape[0], r, E).permute(2, 0, 1)))
    return entries


def _adapter_config(model: Thinker) -> tuple[dict, dict]:
    """(PEFT's adapter_config.json, selfkd's extras): the first holds PEFT's own keys only."""
    modules = lora_modules(model)
    first = modules[0]
    branch = first.lora if isinstance(first, LoRALinear) else first.lora["gate_up_proj"]
    scaling, rank, dropout = branch.scaling, _shape(branch.A)[-2], branch.dropout.p
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    linear = sorted({name.rsplit(".", 1)[-1] for name in wrapped if tower_part(name) is None})
    towers = [part for part in ("vit", "aligner") if any(tower_part(name) == part for name in wrapped)]
    has_experts = any(isinstance(m, LoRAExperts) for m in modules)
    parts = ([rf"language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(linear)})"] if linear else []) + \
        [_TOWER_REGEX[part] for part in towers]
    targets = rf".*\.({'|'.join(parts)})$" if parts else None
    # every other module is excluded: PEFT 0.21 on transformers 5 turns a regex into the leaf names it
    # matches and then takes every module ending in one of them (an LM q_proj regex also picks the
    # audio tower's q_proj, the visual attn.proj one also patch_embed.proj)
    keep = parts + ([r"language_model\.layers\.\d+\.mlp\.experts"] if has_experts else [])
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": rank, "lora_alpha": scaling * rank,
        # PEFT refuses dropout on stacked-expert LoRA; dropout only acts in training, so the file
        # says 0 and the training value is kept in the extras.
        "lora_dropout": 0.0 if has_experts else dropout,
        "target_modules": targets,
        "exclude_modules": rf"(?!.*\.({'|'.join(keep)})$).*",
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"] if has_experts else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }, {"rank": rank, "alpha": scaling * rank, "dropout": dropout, "targets": linear + (["experts"] if has_experts else []),
        "freeze_vit": "vit" not in towers, "freeze_aligner": "aligner" not in towers}


def _gathered(params):
    """Under ZeRO-3 the LoRA weights are partitioned: gather just them (never the base)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return nullcontext()


def _is_rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def adapter_tensors(model: Thinker) -> dict[str, torch.Tensor]:
    """The LoRA weights in PEFT's names and layout, on the CPU. Under ZeRO-3 a collective: every
    rank calls it (only the LoRA weights are gathered, never the base)."""
    entries = _peft_entries(model)
    with _gathered([p for _, p, _, _ in entries]):
        return {k: to_peft(p.detach()).contiguous().cpu().clone() for k, p, to_peft, _ in entries}


def write_adapter(model: Thinker, tensors: dict[str, torch.Tensor], path: str):
    """adapter_model.safetensors + adapter_config.json: what PEFT's from_pretrained reads. One
    process writes (no collectives here, so a failed write cannot leave other ranks waiting)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config, extras = _adapter_config(model)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config, f, indent=2)
    with open(os.path.join(path, ADAPTER_EXTRAS), "w") as f:
        json.dump(extras, f, indent=2)


def save_adapter(model: Thinker, path: str):
    """adapter_tensors on every rank, write_adapter on rank 0: an adapter readable by
    peft.PeftModel.from_pretrained on transformers' Qwen3-Omni thinker."""
    tensors = adapter_tensors(model)
    if _is_rank0():
        write_adapter(model, tensors, path)


def load_adapter(model: Thinker, path: str):
    """Load an adapter written by save_adapter into a model with the same LoRA layout."""
    from safetensors import safe_open

    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path!r}")
    entries = _peft_entries(model)
    if not entries:
        raise ValueError("load_adapter: the model has no LoRA layers; call inject_lora first")
    with safe_open(file, framework="pt") as f:
        on_disk = set(f.keys())
        expected = {k for k, _, _, _ in entries}
        if on_disk != expected:
            missing, extra = sorted(expected - on_disk), sorted(on_disk - expected)
            raise KeyError(f"{file}: adapter does not fit this model's LoRA targets: "
                           f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                           f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
        with _gathered([p for _, p, _, _ in entries]):
            for key, p, to_peft, from_peft in entries:
                t = f.get_tensor(key)
                want = tuple(to_peft(torch.empty(_shape(p), device="meta")).shape)
                if tuple(t.shape) != want:
                    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected {want} "
                                     "(different LoRA rank or model size?)")
                if _is_rank0() or not hasattr(p, "ds_id"):
                    with torch.no_grad():
                        p.copy_(from_peft(t).to(p.dtype))
