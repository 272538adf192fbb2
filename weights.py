"""The released checkpoint, in and out: streaming its safetensors tensors into a Thinker (also into
this rank's ZeRO-3 partitions, with an exact checksum of what each rank holds), and writing a
Thinker back in the released layout (merged exports; tiny.py's random checkpoints).
"""

from __future__ import annotations

import itertools
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_qwen3omni import Thinker, ThinkerConfig, resolve_dtype

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


# --- writing a checkpoint in the released layout ------------------------------------------------


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
