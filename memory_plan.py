"""What each GPU will hold, by phase, before launch.

    python selfkd.py <the training flags> --estimate_memory [--world_size N]
    bash run.sh check --estimate_memory            (N = the processes run.sh would start)

reads config.json alone (the thinker is built on the meta device: exact parameter counts, no
weights), prints a per-GPU table and exits; its last line is `peak per GPU: X GiB in <phase>`.
Every training run logs that line at start and warns when it exceeds the device's memory.

A run moves through phases; what a phase holds adds to what is held all run:

    held all run       base parameters (ZeRO-3: this rank's partition, 1/N of each tensor, and the
                       small persistent ones whole; ZeRO-2 or none: the whole replica), the LoRA
                       parameters, their fp32 master copy, AdamW's two moments and the gradients
                       (sharded under ZeRO-2/3), DeepSpeed's gradient reduce bucket (ZeRO-3 keeps it)
    forward + backward the student's backward starting at the last layer: ZeRO-3's gathered
                       parameters (the module running and its prefetch, DeepSpeed's flat buffer
                       while it splits them, the ones kept for their next use), the layer inputs
                       that gradient checkpointing keeps for every micro-batch of the step, one
                       layer's activations as it is recomputed, and the gradients of its backward
    loss               lm_head (gathered under ZeRO-3), the loss's two [chunk, V] logits buffers
                       and its fp32 row-block buffers, both prompts' final hidden states
    generation         on-policy or --seq_kd steps: the gathered model (--gather_for_generation
                       under ZeRO-3: a full copy of the thinker on every GPU), the KV cache for
                       batch x (prompt + max_completion_length), the prefill's activations
    checkpoint save    the adapter gathered (ZeRO-3), then the AdamW state one tensor at a time;
                       rank 0 keeps the whole optimizer state in host memory

Sizes come from the code they describe: the activation counts follow Block.forward, Attention,
SparseMoE and lora.py op by op (what autograd saves for the backward), the loss buffers follow
loss.py, the DeepSpeed buffers and gathers follow DeepSpeed 0.19's ZeRO stage 2 and 3 with the
zero_optimization section selfkd.deepspeed_config builds. tests/test_memory_plan.py holds them to
measurement. The design point is a micro-batch of max_length tokens (a prompt of max_length -
max_completion_length and a full completion). Not counted: the CUDA context and allocator
fragmentation (leave ~2-4 GiB per GPU) and the towers' activations (they depend on the media).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lora import LoRAExperts, LoRALinear, inject_lora
from model_qwen3omni import MLP, SparseMoE, Thinker, ThinkerConfig

GiB = 2**30

# DeepSpeed's defaults for the zero_optimization keys the plan reads (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True, "stage3_prefetch_bucket_size": 5e7,
                 "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 1e5,
                 "stage3_max_reuse_distance": 1e9}
# ZeRO-3 gathers a prefetch's parameters into one flat buffer and copies each out (torch.cat); the
# buffer lives until the last of them is used (deepspeed/runtime/zero/partition_parameters.py,
# AllGatherCoalescedHandle; partitioned_param_coordinator.py, the in-flight registry)
FLAT_BUFFER = "  ...and DeepSpeed's flat all-gather buffer of the prefetch, until its last parameter is used"
GPU_ROWS_PER_BLOCK = 64  # loss.py: rows of the fp32 work buffers per block on a GPU
LOSS_WORK_BUFFERS = 9  # loss.py: WORK_BUFFERS + 2 fp32 copies of lower-precision rows
LOSS_CHUNK = 1024  # loss.py: chunk_size of chunked_jsd_loss_sum / sft_loss_sum


# ----------------------------------------------------------------------------------------------
# The plan: phases of items


@dataclass
class Item:
    what: str
    nbytes: float
    on_host: bool = False  # held in CPU memory (offload, rank 0's checkpoint copy), not on the GPU


@dataclass
class Phase:
    name: str
    items: list[Item] = field(default_factory=list)

    def add(self, what: str, nbytes: float, on_host: bool = False):
        if nbytes > 0:
            self.items.append(Item(what, nbytes, on_host))

    def gpu_bytes(self) -> float:
        return sum(i.nbytes for i in self.items if not i.on_host)


@dataclass
class MemoryPlan:
    header: list[str]
    held: Phase
    phases: list[Phase]
    notes: list[str]

    def total(self, phase: Phase) -> float:
        """GPU bytes at the phase's peak: what is held all run plus the phase's own items."""
        return self.held.gpu_bytes() + phase.gpu_bytes()

    def peak(self) -> tuple[float, str]:
        """(bytes, phase name) of the largest phase."""
        return max(((self.total(p), p.name) for p in self.phases), default=(self.held.gpu_bytes(), self.held.name))

    def peak_line(self) -> str:
        nbytes, name = self.peak()
        return f"peak per GPU: {nbytes / GiB:.1f} GiB in {name}"

    def table(self) -> str:
        width = max(len(i.what) for p in [self.held, *self.phases] for i in p.items) + 4
        width = max(width, 60)
        lines = list(self.header) + ["", f"{'phase / what it holds':<{width}} {'GiB':>8}"]
        for phase in [self.held, *self.phases]:
            lines.append(phase.name + (" (in every phase below)" if phase is self.held else ""))
            for item in phase.items:
                where = " (host)" if item.on_host else ""
                lines.append(f"  {item.what + where:<{width - 2}} {item.nbytes / GiB:>8.2f}")
            total = self.held.gpu_bytes() if phase is self.held else self.total(phase)
            label = "= held" if phase is self.held else "= on the GPU in this phase (held + the above)"
            lines.append(f"  {label:<{width - 2}} {total / GiB:>8.2f}")
        lines += [""] + [f"note: {n}" for n in self.notes] + [self.peak_line()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The model on the meta device: exact parameter counts, no memory


@dataclass
class Unit:
    """Parameters ZeRO-3 gathers together: one module's own, or a leaf module's whole subtree."""
    name: str
    params: list[tuple[int, bool]]  # (elements, trainable), base before LoRA (the order ZeRO-3 numbers them in)
    leaf: bool


def fetch_units(model: Thinker) -> list[Unit]:
    """ZeRO-3's fetch units in the order a training forward calls them: the towers, embed_tokens,
    per layer the norms, attention projections (their LoRA branches apart) and the MoE block (a
    leaf: gathered whole, its LoRA included), the final norm. lm_head is not among them: the loss
    gathers it by itself."""
    units, inside_leaf = [], ()
    order = [(n, m) for n, m in model.named_modules() if n.startswith(("audio_tower", "visual"))]
    order += [(n, m) for n, m in model.named_modules() if n and not n.startswith(("audio_tower", "visual", "lm_head"))]
    for name, module in order:
        if inside_leaf and name.startswith(inside_leaf):
            continue
        leaf = isinstance(module, SparseMoE)
        if leaf:
            inside_leaf = name + "."
        params = sorted(module.parameters(recurse=leaf), key=lambda p: p.requires_grad)
        if params:
            units.append(Unit(name, [(p.numel(), p.requires_grad) for p in params], leaf))
    return units


@dataclass
class ModelCounts:
    """Parameter counts of the student (base + LoRA) as selfkd builds it."""
    cfg: ThinkerConfig
    model: Thinker  # on the meta device
    base: list[tuple[str, int]]  # (name, numel) of the frozen parameters
    lora: list[tuple[str, int]]  # (name, numel) of the LoRA parameters
    units: list[Unit]  # ZeRO-3's fetch units, in forward order

    @property
    def base_numel(self) -> int:
        return sum(n for _, n in self.base)

    @property
    def lora_numel(self) -> int:
        return sum(n for _, n in self.lora)

    def numel(self, prefix: str) -> int:
        return sum(n for name, n in self.base + self.lora if name.startswith(prefix))


def meta_student(cfg, mcfg: ThinkerConfig) -> ModelCounts:
    """The thinker + LoRA exactly as selfkd.build_student makes it, on the meta device."""
    with torch.device("meta"):  # the LoRA too: its random init would cost seconds at 30B and is not needed
        model = Thinker(mcfg)
        inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, ",".join(cfg.lora_target_modules),
                    freeze_vit=cfg.freeze_vit, freeze_aligner=cfg.freeze_aligner)
    named = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    return ModelCounts(mcfg, model, [(n, k) for n, k, g in named if not g], [(n, k) for n, k, g in named if g],
                       fetch_units(model))


# ----------------------------------------------------------------------------------------------
# DeepSpeed settings that decide the sizes


@dataclass
class Zero:
    stage: int
    offload_param: bool
    offload_optimizer: bool
    reduce_bucket: int  # elements
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket: int  # elements
    max_live: int  # elements
    persistence: int  # parameters with at most this many elements stay whole on every rank (ZeRO-3)
    frozen_persistence: int  # frozen ones with at most this many elements too (selfkd.build_student)
    reuse_distance: int  # elements (stage3_max_reuse_distance)
    grad_bytes: int  # bytes per element of the gradient partitions (grad_accum_dtype)

    def persistent(self, numel: int, trainable: bool) -> bool:
        """Whether ZeRO-3 keeps this parameter whole on every rank instead of gathering it per use."""
        return numel <= self.persistence or (not trainable and numel <= self.frozen_persistence)

    @classmethod
    def from_config(cls, ds: dict, dtype_bytes: int, frozen_persistence: int = 0) -> "Zero":
        z = {**ZERO_DEFAULTS, **(ds.get("zero_optimization") or {})}
        stage = int(z.get("stage", 0))
        device = lambda key: ((z.get(key) or {}).get("device") or "none") in ("cpu", "nvme")  # noqa: E731
        accum = ((ds.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
        return cls(stage=stage, offload_param=stage == 3 and device("offload_param"),
                   offload_optimizer=device("offload_optimizer"), reduce_bucket=int(z["reduce_bucket_size"]),
                   overlap_comm=bool(z.get("overlap_comm", stage == 3)),
                   contiguous_gradients=bool(z["contiguous_gradients"]),
                   prefetch_bucket=int(z["stage3_prefetch_bucket_size"]),
                   max_live=int(z["stage3_max_live_parameters"]),
                   persistence=int(z["stage3_param_persistence_threshold"]), frozen_persistence=frozen_persistence,
                   reuse_distance=int(z["stage3_max_reuse_distance"]),
                   grad_bytes=4 if accum in ("fp32", "float32", "float") else dtype_bytes)


def zero3_gathered(units: list[Unit], zero: Zero) -> tuple[int, int, int, str]:
    """(fetched, bucket, kept, where): what ZeRO-3 holds gathered at the step's peak (the last
    layer's backward; the same set during the loss), as the module running plus its prefetch, the
    prefetch's flat all-gather buffer, and the ones kept for their next use.

    fetched: the module running is gathered whole (the MoE block with all its experts and their
    LoRA, whatever the tokens route to); once the step's fetch order is known (selfkd records one
    per optimizer step), DeepSpeed also prefetches the parameters that come next, one by one, until
    stage3_prefetch_bucket_size elements are on their way (the last one whole: often the next
    layer's expert stack), while fewer than stage3_max_live_parameters are gathered.
    bucket: a prefetch's flat buffer; each parameter's in-flight entry holds it until that
    parameter's own module fetches it, so it lives until the next layer's expert stack is used.
    kept: a module's parameters stay gathered after it ran when they are used again within
    stage3_max_reuse_distance elements of fetches. Counting as DeepSpeed does (a leaf module looks
    ahead over whole subtrees, any other module over modules' own parameters), that keeps the last
    layer's MoE block from the student's forward into its backward (the module running at the
    peak: in fetched) and the attention of the last layers whose recomputation comes soon enough:
    between a layer's forward and its recomputation lie the rest of the forward and, per later
    layer, its recomputation and backward, three times its attention (the next layer's is in the
    prefetch). Parameters small enough to persist are always there and not counted here."""
    sizes = [[n for n, trainable in u.params if not zero.persistent(n, trainable)] for u in units]
    fetched, bucket, where = 0, 0, ""
    for i, unit in enumerate(units):
        current = sum(sizes[i])
        budget = min(zero.prefetch_bucket, max(0, zero.max_live - current))
        ahead, j = 0, i + 1
        while ahead < budget and j < i + len(units):  # the next pass follows this one
            for n in sizes[j % len(units)]:
                if ahead >= budget:
                    break
                ahead += n
            j += 1
        bucket = max(bucket, ahead)
        if current + ahead > fetched:
            fetched, where = current + ahead, unit.name
    kept = 0
    if zero.reuse_distance > 0:
        layers = {}  # layer index -> its attention's (and norms') gathered elements
        for u, size in zip(units, sizes):
            if u.name.startswith("layers.") and not u.leaf:
                i = int(u.name.split(".")[1])
                layers[i] = layers.get(i, 0) + sum(size)
        attention = max(layers.values(), default=0)
        if attention:
            kept_layers = min(len(layers), zero.reuse_distance // (3 * attention) + 1)
            kept = max(0, kept_layers - (zero.prefetch_bucket > 0)) * attention
    total = sum(map(sum, sizes))
    fetched = min(fetched, total)
    return fetched, min(bucket, total), min(kept, total - fetched), where


# ----------------------------------------------------------------------------------------------
# Activations: what autograd keeps, counted from the code


def layer_saved_bytes(block, batch: int, seq: int, d: int, dropout: float, device: str = "cuda",
                      masked: bool = True) -> dict[str, float]:
    """Bytes one decoder layer keeps for its backward over batch x seq tokens (training, LoRA on),
    by part. Autograd keeps only what a gradient needs: with the base weights frozen, a base
    matmul keeps no activation, and a product keeps a factor only for the other's gradient.

    d: bytes of the activation dtype. What is kept: the fp32 inputs of the RMSNorms (the input
    layernorm's is the layer input itself when that already is fp32); SDPA's q, k, v, output and
    log-sum-exp, plus the boolean mask turned into an additive bias [B, 1, T, T] in the dtype
    when a mask is passed (`masked`); the router's fp32 probabilities; per routed row [N*top_k]
    the gate|up output (SiLU's input), the SiLU output and the expert output before weighting.
    Each LoRA branch keeps its rank-r intermediate and, with dropout, the mask (bool on a GPU,
    the dtype on a CPU) and the dropped input; without dropout the input itself (the norm output,
    the routed rows, the SiLU product)."""
    N, attn = batch * seq, block.self_attn
    H = block.input_layernorm.weight.shape[0]
    heads, hd = attn.n_heads, attn.head_dim
    q, k = heads * hd, attn.n_kv * hd
    keep = (dropout > 0) * ((1 if device == "cuda" else d) + d)  # per element of a LoRA input
    parts = {"norms (fp32 inputs)": 4 * N * (H * (d != 4) + H + q + k),
             "attention (SDPA)": d * N * (2 * q + 2 * k) + 4 * N * heads + masked * batch * seq * seq * d}
    lora, plain_inputs = 0.0, set()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer = getattr(attn, name)
        if isinstance(layer, LoRALinear):
            lora += N * (layer.in_features * keep + layer.lora.A.shape[0] * d)
            if name != "o_proj":  # o_proj's input is the SDPA output's storage, counted above
                plain_inputs.add(("norm output", N * H * d))
    mlp = block.mlp
    if isinstance(mlp, SparseMoE):
        E, K, I = mlp.experts.num_experts, mlp.top_k, mlp.experts.inter
        NK = N * K
        parts["MoE router"] = 4 * N * E + 24 * NK
        parts["MoE experts"] = d * NK * (3 * I + H)
        if isinstance(mlp.experts, LoRAExperts):
            lora += NK * ((H + I) * keep + 2 * mlp.experts.lora["gate_up_proj"].A.shape[1] * d)
            plain_inputs |= {("routed rows", d * NK * H), ("SiLU product", d * NK * I)}
    elif isinstance(mlp, MLP):
        I = mlp.gate_proj.out_features
        parts["MLP"] = d * N * 3 * I
        for name, f in (("gate_proj", H), ("up_proj", H), ("down_proj", I)):
            layer = getattr(mlp, name)
            if isinstance(layer, LoRALinear):
                lora += N * (f * keep + layer.lora.A.shape[0] * d)
                plain_inputs.add(("MLP norm output" if f == H else "MLP product", N * f * d))
    parts["LoRA branches"] = lora + (0 if dropout > 0 else sum(n for _, n in plain_inputs))
    return parts


def layer_backward_bytes(block, tokens: int, d: int) -> float:
    """The gradients a layer's backward holds at once, at its largest (the MoE block): the
    gradient of the routed rows [tokens * top_k, H] twice (expert outputs and inputs), of one
    gate|up output, and of the layer's input and output [tokens, H]."""
    H = block.input_layernorm.weight.shape[0]
    mlp = block.mlp
    if isinstance(mlp, SparseMoE):
        rows, inter = tokens * mlp.top_k, mlp.experts.inter
    else:
        rows, inter = tokens, mlp.gate_proj.out_features
    return d * (rows * (2 * H + 2 * inter) + 2 * tokens * H)


def layer_inference_bytes(block, tokens: int, d: int, grouped: bool = False) -> float:
    """The most one layer holds at once in a no-grad forward (the prefill), besides the residual
    stream, the norm and the router's probabilities. The MoE block on its per-expert loop (a CPU):
    its routed copy of the input and its expert outputs, twice while they are concatenated and
    weighted. On the grouped path (a GPU, bf16), at the down projection: the routed copy, gate|up,
    the SiLU product and the output, with LoRA on the experts the branch's output, scaled, and
    their sum instead of the output alone (the simulated GPU measures this: simulate.py)."""
    H = block.input_layernorm.weight.shape[0]
    mlp = block.mlp
    if isinstance(mlp, SparseMoE):
        rows, I = tokens * mlp.top_k, mlp.experts.inter
        if grouped:
            outputs = 3 if isinstance(mlp.experts, LoRAExperts) else 1
            moe = rows * (H + 3 * I + outputs * H)
        else:
            moe = rows * 3 * H
        return d * (moe + tokens * 3 * H) + 4 * tokens * mlp.experts.num_experts
    return d * tokens * (3 * H + 3 * mlp.gate_proj.out_features)


def graph_bytes(m: ThinkerConfig, B: int, T: int, n: int, d: int, masked: bool = True) -> float:
    """Besides the layer inputs, what one micro-batch's student graph keeps until its backward:
    the final norm's fp32 input, the rotary cos/sin tables, the boolean attention mask
    [B, 1, T, T] (when one is passed) and the loss's precomputed gradient [n, H]."""
    N, H = B * T, m.hidden_size
    return N * H * 4 + 2 * N * m.head_dim * d + masked * B * T * T + n * H * d


# ----------------------------------------------------------------------------------------------
# The plan


def dtype_bytes(name: str) -> int:
    return {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}[name]


@dataclass
class Run:
    """The sizes a plan is made of, from the flags, the config and the parameter counts."""
    cfg: object  # flags.Config
    counts: ModelCounts
    zero: Zero
    world: int
    device: str  # "cuda", or "cpu" for a CPU run

    def __post_init__(self):
        c, m = self.cfg, self.counts.cfg
        self.d = dtype_bytes(c.torch_dtype)  # bytes per weight and activation element
        self.B, self.G = c.per_device_train_batch_size, c.gradient_accumulation_steps
        self.C = c.max_completion_length
        self.T, self.P = c.max_length, c.max_length - self.C  # the design point: a full row of max_length
        self.N, self.n = self.B * self.T, self.B * self.C  # a micro-batch's tokens; completion tokens it scores
        self.H, self.V, self.L = m.hidden_size, m.vocab_size, m.num_hidden_layers
        self.base, self.lora = self.counts.base_numel, self.counts.lora_numel
        self.masked = not getattr(self.counts.model, "causal_without_mask", False)  # SDPA gets the bool mask
        self.biggest = max(self.counts.model.layers, key=self.saved)  # the layer that keeps the most

    def shard(self, numel: int) -> int:
        """This rank's share of a tensor: ZeRO pads each one to a multiple of the world size."""
        return math.ceil(numel / self.world)

    def lora_shard(self) -> int:
        if self.zero.stage == 3:
            return sum(self.shard(k) for _, k in self.counts.lora)
        return self.shard(self.lora) if self.zero.stage else self.lora

    def saved(self, block) -> float:
        """One layer's activations kept for its backward, for one micro-batch."""
        c = self.cfg
        return sum(layer_saved_bytes(block, self.B, self.T, self.d, c.lora_dropout, self.device, self.masked).values())

    def graphs(self) -> float:
        """What the step's student graphs keep until their backward, every micro-batch of the step
        (train_step runs every micro-batch's forward and loss before the first backward)."""
        extra = graph_bytes(self.counts.cfg, self.B, self.T, self.n, self.d, self.masked)
        if self.cfg.gradient_checkpointing:
            return self.G * (self.L * self.N * self.H * self.d + extra)
        kept = self.G * (sum(self.saved(b) for b in self.counts.model.layers) + extra)
        if self.zero.stage == 3:  # the per-expert weight views autograd saves keep each gathered stack
            kept += sum(self.counts.numel(f"layers.{i}.mlp.") for i in range(self.L)) * self.d
        return kept

    def gathered(self) -> tuple[int, int, int, str]:
        return zero3_gathered(self.counts.units, self.zero) if self.zero.stage == 3 else (0, 0, 0, "")

    def add_gathered(self, phase: Phase):
        """ZeRO-3's gathered parameters (zero3_gathered), the flat buffer of the prefetch, the kept ones."""
        fetched, bucket, kept, where = self.gathered()
        z = self.zero
        phase.add(f"ZeRO-3 gathered: {where} ({fetched / 1e6:.0f}M, the module running + prefetch "
                  f"{z.prefetch_bucket:.0e}, max live {z.max_live:.0e})", fetched * self.d)
        phase.add(FLAT_BUFFER + f" ({bucket / 1e6:.0f}M)", bucket * self.d)
        phase.add(f"ZeRO-3 kept gathered for their next use ({kept / 1e6:.0f}M: the last layers' attention; "
                  f"reuse distance {z.reuse_distance:.0e})", kept * self.d)


def held_phase(r: Run) -> Phase:
    held, z, d, W = Phase("held all run"), r.zero, r.d, r.world
    if z.stage == 3:
        persistent = [k for _, k in r.counts.base if z.persistent(k, False)]
        persistent += [k for _, k in r.counts.lora if z.persistent(k, True)]
        part = sum(r.shard(k) for _, k in r.counts.base)
        held.add(f"base parameters: ZeRO-3 partition, 1/{W} of {r.base / 1e9:.2f}B", part * d, z.offload_param)
        held.add(f"persistent small parameters, kept whole as well ({len(persistent)}: norms, routers)",
                 sum(persistent) * d)
        held.add(f"LoRA parameters: partition, 1/{W} of {r.lora / 1e6:.1f}M", r.lora_shard() * d, z.offload_param)
    else:
        held.add(f"base parameters: whole replica of {r.base / 1e9:.2f}B (ZeRO-{z.stage})", r.base * d)
        held.add(f"LoRA parameters: whole ({r.lora / 1e6:.1f}M)", r.lora * d)
    share = f", 1/{W}" if z.stage else ""
    held.add(f"LoRA fp32 master weights{share}", r.lora_shard() * 4, z.offload_optimizer)
    held.add(f"AdamW exp_avg + exp_avg_sq (fp32{share})", 2 * r.lora_shard() * 4, z.offload_optimizer)
    if z.stage == 3:
        held.add(f"LoRA gradient partitions{share}", r.lora_shard() * z.grad_bytes, z.offload_optimizer)
        if z.contiguous_gradients:  # allocated once, whole, at deepspeed.initialize
            held.add(f"gradient reduce bucket (reduce_bucket_size {z.reduce_bucket:.0e})", z.reduce_bucket * d)
    elif z.stage == 0:
        held.add("LoRA gradients", r.lora * d)
    if r.device == "cpu":  # loss.py keeps its logits buffers between calls on a CPU (a fresh one page-faults)
        rows = loss_rows(r.n)
        held.add(f"loss logits buffers: 2 x [{rows}, {r.V}] (a CPU keeps them between steps)", 2 * rows * r.V * d)
    return held


def forward_backward_phase(r: Run) -> Phase:
    """At the start of the student's backward: every micro-batch's graph, the last layer recomputed."""
    fb, z, d = Phase("forward + backward"), r.zero, r.d
    r.add_gathered(fb)
    if z.stage == 2:  # allocated at the first gradient, released after the step
        buckets = 2 if z.overlap_comm else 1
        fb.add(f"gradient reduce bucket x{buckets} (reduce_bucket_size {z.reduce_bucket:.0e})",
               buckets * z.reduce_bucket * d * z.contiguous_gradients)
        fb.add(f"LoRA gradient partition, 1/{r.world}", r.lora_shard() * d)
    if r.cfg.gradient_checkpointing:
        fb.add(f"checkpointed layer inputs: {r.G} micro-batch(es) x {r.L} layers x [{r.B}, {r.T}, {r.H}]",
               r.G * r.L * r.N * r.H * d)
        fb.add(f"final norm, rotary tables, mask, loss gradient (x{r.G} micro-batches)",
               r.graphs() - r.G * r.L * r.N * r.H * d)
        fb.add(f"one layer recomputed for its backward, saved activations ({r.B} x {r.T} tokens)", r.saved(r.biggest))
    else:
        fb.add(f"every layer's saved activations, no checkpointing (x{r.G} micro-batches"
               + (", with the gathered expert stacks autograd keeps" if z.stage == 3 else "") + ")", r.graphs())
    fb.add("gradients inside that layer's backward", layer_backward_bytes(r.biggest, r.N, d))
    return fb


def loss_rows(n: int) -> int:
    """Rows of loss.py's logits buffers for n scored tokens: chunks of at most LOSS_CHUNK, balanced."""
    return math.ceil(n / max(1, math.ceil(n / LOSS_CHUNK)))


def loss_phase(r: Run) -> Phase:
    """The last micro-batch's loss: the graphs so far, both passes' hidden states, the loss buffers."""
    loss, d, V, rows = Phase("loss"), r.d, r.V, loss_rows(r.n)
    if r.zero.stage == 3:
        loss.add(f"lm_head gathered [{V}, {r.H}]", V * r.H * d)
        r.add_gathered(loss)  # what the student's forward left gathered for its backward
    if r.device != "cpu":
        loss.add(f"logits buffers: 2 x [{rows}, {V}]", 2 * rows * V * d)
    k = min(rows, 2 if r.device == "cpu" else GPU_ROWS_PER_BLOCK)
    loss.add(f"loss work buffers: {LOSS_WORK_BUFFERS} x [{k}, {V}] fp32", LOSS_WORK_BUFFERS * k * V * 4)
    if r.cfg.sft_alpha > 0:
        loss.add(f"SFT log-softmax [{rows}, {V}] fp32", rows * V * 4)
    loss.add(f"final hidden states, teacher + student [{r.B}, {r.T}, {r.H}], and their completion rows",
             2 * r.N * r.H * d + 4 * r.n * r.H * d)
    loss.add("the student graphs so far (as in forward + backward, without the recomputed layer)", r.graphs())
    return loss


def generation_phase(r: Run) -> Phase:
    """Sampling a micro-batch's completions (before any graph of the step exists)."""
    gen, z, d, m = Phase("generation"), r.zero, r.d, r.counts.cfg
    if z.stage == 3 and r.cfg.gather_for_generation:
        gen.add(f"whole model gathered (--gather_for_generation): {(r.base + r.lora) / 1e9:.2f}B parameters",
                (r.base + r.lora) * d)
    elif z.stage == 3:  # --gather_for_generation false: gathered per module at every decode step
        r.add_gathered(gen)
    kv = 2 * r.L * r.B * m.num_key_value_heads * (r.P + r.C) * m.head_dim * d
    gen.add(f"KV cache: {r.L} layers x 2 x [{r.B}, {m.num_key_value_heads}, {r.P} + {r.C}, {m.head_dim}]", kv)
    gen.add(f"prefill of {r.B} x {r.P} prompt tokens (no grad, one layer at a time)",
            layer_inference_bytes(r.biggest, r.B * r.P, d, grouped=r.device == "cuda" and d == 2)
            + r.B * r.P * r.H * d + 6 * r.B * r.V * 4)
    return gen


def save_phase(r: Run) -> Phase:
    """save_checkpoint: adapter_tensors (ZeRO-3 gathers every LoRA weight at once), then, without
    --save_only_model, optimizer_tensors (one parameter's fp32 weights and moments at a time)."""
    save, d = Phase("checkpoint save"), r.d
    on_gpu = r.lora * d if r.zero.stage == 3 else 0
    if not r.cfg.save_only_model:
        on_gpu = max(on_gpu, 3 * max((k for _, k in r.counts.lora), default=0) * 4)
    save.add("adapter gathered (ZeRO-3), then one LoRA tensor's fp32 weights + moments", on_gpu)
    save.add("adapter copy (every rank)", r.lora * d, on_host=True)
    if not r.cfg.save_only_model:
        save.add("optimizer state (rank 0: fp32 weights + 2 moments)", 3 * r.lora * 4, on_host=True)
    return save


def estimate(cfg, ds: dict, world: int, counts: ModelCounts, device: str = "cuda",
             persistent_numel: int = 0) -> MemoryPlan:
    """The per-GPU plan for training flags `cfg` (flags.Config) with DeepSpeed config `ds`
    (selfkd.deepspeed_config) on `world` processes; `counts` from meta_student. device "cpu"
    plans a CPU run: the loss's row blocks of 2 rows (not 64), its logits buffers held between steps.
    persistent_numel: under ZeRO-3, frozen tensors of at most this many elements are kept whole on
    every rank (what selfkd.build_student marks persistent), besides DeepSpeed's own threshold."""
    r = Run(cfg, counts, Zero.from_config(ds, dtype_bytes(cfg.torch_dtype), persistent_numel), world, device)
    samples = cfg.lmbda > 0 or cfg.seq_kd
    phases = [forward_backward_phase(r), loss_phase(r)] + ([generation_phase(r)] if samples else []) + [save_phase(r)]
    held = held_phase(r)
    m = counts.cfg
    towers = [t for t in ("audio_tower", "visual") if getattr(counts.model, t) is not None]
    tower_size = counts.numel("audio_tower") + counts.numel("visual")
    header = [
        "memory plan per GPU (estimated from config.json; selfkd.py --estimate_memory)",
        f"model: {r.L} layers, {m.num_experts} experts top-{m.num_experts_per_tok}, hidden {r.H}, vocab {r.V}, "
        + (f"with {' and '.join(towers)} ({tower_size / 1e9:.2f}B)" if towers else "text only (no towers)"),
        f"parameters: base {r.base:,}, LoRA r={cfg.lora_rank} on {' '.join(cfg.lora_target_modules)} {r.lora:,}",
        f"run: {cfg.deepspeed} (ZeRO stage {r.zero.stage}) on {world} GPU(s), {cfg.torch_dtype}; micro-batch {r.B} x "
        f"{r.T} tokens (prompt {r.P} + completion {r.C}), gradient accumulation {r.G}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, gather_for_generation "
        f"{'on' if cfg.gather_for_generation else 'off'}",
    ]
    notes = ["not counted: the CUDA context and allocator fragmentation (allow 2-4 GiB per GPU)"
             + (", the towers' activations (they depend on the media)" if towers else ""),
             f"a micro-batch that pads a long prompt and a long completion together reaches up to "
             f"{r.T + r.C - 1} tokens; activations, KV cache and loss grow in proportion"]
    if not samples:
        notes.append("no generation phase: --lmbda 0 and --seq_kd false never sample")
    host = [i for p in [held, *phases] for i in p.items if i.on_host]
    if host:
        notes.append("host memory: " + "; ".join(f"{i.what} {i.nbytes / GiB:.2f} GiB" for i in host))
    return MemoryPlan(header, held, phases, notes)


# ----------------------------------------------------------------------------------------------
# Entry points for selfkd.py


def dataset_has_media(specs: list[str]) -> bool | None:
    """Whether any row of the datasets carries images, audio or video (ms-swift lists or content
    parts), from a cheap scan of the files (nothing is decoded); None when a file is not readable
    here (then the towers are left out of the plan, and a note says so)."""
    from data import MEDIA_KINDS, _parse_spec, _read_rows

    def has_media(node) -> bool:
        if isinstance(node, dict):
            if node.get("type") in MEDIA_KINDS or any(node.get(k + "s") for k in MEDIA_KINDS):
                return True
            return any(has_media(v) for v in node.values() if isinstance(v, (dict, list)))
        return isinstance(node, list) and any(has_media(v) for v in node)

    try:
        return any(has_media(row) for spec in specs for _, row in _read_rows(_parse_spec(spec)[0]))
    except Exception:  # noqa: BLE001 - a dataset that is not here does not stop the estimate
        return None


def plan_for(cfg, ds: dict, world: int, towers: bool | None = None, device: str = "cuda",
             persistent_numel: int = 0) -> MemoryPlan:
    """The plan for a run of `cfg` on `world` processes. towers: whether the towers are built
    (the data has media, or LoRA goes on them); None: detect it from the dataset files."""
    note = None
    if towers is None:
        media = dataset_has_media(cfg.dataset)
        towers = bool(media) or not (cfg.freeze_vit and cfg.freeze_aligner)
        if media is None:
            note = "the dataset files are not readable here: planned without the audio and vision towers"
    mcfg = ThinkerConfig.from_pretrained(cfg.model, towers=towers)
    plan = estimate(cfg, ds, world, meta_student(cfg, mcfg), device=device, persistent_numel=persistent_numel)
    if note:
        plan.notes.insert(0, note)
    return plan


# Cards the fit table answers for: (name, GiB a process can allocate: about what torch reports as
# the device's total memory; the driver and CUDA context keep the rest of the card's 80 / 141 GB).
CARDS = (("80 GB (H100, A100)", 79.0), ("141 GB (H200)", 139.0))
FIT_WORLDS = (1, 2, 4, 8, 16)


def changes_to_fit(cfg) -> list[tuple[str, dict]]:
    """The changes that lower the peak, cheapest first, each including those before it: (the flags
    as a user types them, the Config fields they set)."""
    steps, fields = [], {}
    if cfg.deepspeed == "zero2":
        steps.append(dict(deepspeed="zero3"))
    if cfg.gather_for_generation:
        steps.append(dict(gather_for_generation=False))
    batch, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    while batch > 1 and batch % 2 == 0:  # the same rows per optimizer step, half of them at a time
        batch, accumulation = batch // 2, accumulation * 2
        steps.append(dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation))
    if cfg.deepspeed != "zero3_offload":
        steps.append(dict(deepspeed="zero3_offload"))
    out = []
    for step in steps:
        fields = {**fields, **step}
        flags = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())
        out.append((flags, dict(fields)))
    return out


def fit_table(cfg, peak_gib, worlds=FIT_WORLDS, cards=CARDS) -> str:
    """One row per process count, one column per card: 'fits' with the peak, or the cheapest change
    (changes_to_fit) after which the plan fits. peak_gib(cfg, world) -> the plan's peak in GiB."""
    from dataclasses import replace

    head = f"{'GPUs':>4}  " + "  ".join(f"{name:<46}" for name, _ in cards)
    lines = ["fits? the same flags on other launches (peak per GPU; where it does not fit, the cheapest change "
             "that makes it fit):", head]
    for world in worlds:
        peak, cells, tried = peak_gib(cfg, world), [], {}
        for _, usable in cards:
            if peak <= usable:
                cells.append(f"fits ({peak:.1f} GiB)")
                continue
            for label, fields in changes_to_fit(cfg):
                if label not in tried:
                    tried[label] = peak_gib(replace(cfg, **fields), world)
                if tried[label] <= usable:
                    cells.append(f"{label} ({tried[label]:.1f} GiB)")
                    break
            else:
                cells.append(f"does not fit ({peak:.1f} GiB)")
        lines.append(f"{world:>4}  " + "  ".join(f"{c:<46}" for c in cells))
    return "\n".join(lines)


def start_lines(cfg, ds: dict, world: int, towers: bool, device, persistent_numel: int = 0) -> list[str]:
    """What a training run logs at start: the plan's peak and, on a GPU whose memory it exceeds,
    a warning. On a CPU the peak is only shown (the processes share the host's memory, and
    DeepSpeed's untouched buffers cost no pages there)."""
    plan = plan_for(cfg, ds, world, towers=towers, device=device.type, persistent_numel=persistent_numel)
    peak, phase = plan.peak()
    lines = [plan.peak_line() + " (estimated; the table: selfkd.py <flags> --estimate_memory)"]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if peak > total:
            lines.append(f"WARNING: the memory plan's peak, {peak / GiB:.1f} GiB in {phase}, exceeds this GPU's "
                         f"{total / GiB:.1f} GiB: expect an out-of-memory error. --estimate_memory shows where it "
                         "goes; --gather_for_generation false, a smaller --per_device_train_batch_size or "
                         "--max_length, or more GPUs under ZeRO-3 lower it.")
    return lines
