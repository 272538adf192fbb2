"""Omni forward and multimodal GKD step: selfkd vs the Hugging Face stack, same weights, same media, same seed.

    .venv/bin/python bench/bench_omni.py [--reps 3] [--only forward,step,reuse,memory] [--json out.json]
    .venv/bin/python bench/bench_omni.py --real-towers     # the towers at the released widths (slower)

Model: the Qwen3-Omni thinker WITH its audio and vision towers, fp32 on CPU.
  language model  hidden 256, 4 layers, 8/2 heads x 32, 16 experts top-4, expert intermediate 128,
                  vocab 152064 (the real one, so the vocab-wide loss has its real cost)
  audio tower     2 layers, d_model 512, 8 heads, ffn 2048, conv channels 128 (released: 32 layers,
                  1280, 20, 5120, 480); the released structure (128 mel bins, 1 s chunks, 13 tokens per
                  chunk, 8 s windows)
  vision tower    3 blocks, hidden 512, 8 heads, intermediate 2048, deepstack after blocks 0, 1, 2
                  (released: 27 blocks, 1152, 16, 4304, deepstack after 8, 16, 24); 16-px patches,
                  2x2 merge, the released 48x48 position grid
  --real-towers   both towers at the released widths (still 2 and 3 layers, or --tower-layers)
One random checkpoint in the released layout (tiny.write_random_checkpoint: towers at unit scale, LM
std 0.02), loaded twice: ours with load_thinker(towers=True), the peer with transformers'
Qwen3OmniMoeForConditionalGeneration.from_pretrained(...).thinker. LoRA r8 alpha16 dropout 0 on
q,k,v,o + experts (towers frozen, as --freeze_vit/--freeze_aligner true); B randomised (else the
student is the teacher: loss 0); PEFT loads OUR adapter file, so the LoRA weights match too.

Media, built with media.py (no transformers processor): per row one 448x448 image
(image_patches: 784 patches, 196 tokens) and one 10 s clip (log_mel: 1000 frames, 130 tokens), in a
different order and with different text in the two rows (left padding); batch 2. The prompts are
chat.EncodedExample rows collated by chat.collate, which hands ONE MediaInputs to teacher and student
when both prompts carry the same media. transformers gets the same tensors: pixel_values,
image_grid_thw, input_features [n, 128, frames] + feature_attention_mask.

Sections (--only):
  forward  the omni forward (towers + LM -> logits [B, P, V]) under no_grad, LoRA off on both sides
           (ours: lora_disabled; peer: disable_adapter()), and the towers alone (encode_media vs
           transformers' get_audio_features + get_image_features); logits and tower outputs checked.
  step     one multimodal GKD step, off-policy (dataset completion) and on-policy (the student samples
           --completion tokens first). selfkd: selfkd.train_step, as the training loop calls it, on the
           one-process DeepSpeed engine selfkd.py builds (bench_gkd.selfkd_engine: ZeRO-2, AdamW; towers
           once per step, also for sampling, teacher pass under no_grad + lora_disabled, student pass,
           chunked JSD on the completion positions, backward, step). The checks before it (loss and
           gradient against the peer, tower calls) use the bare step, selfkd.gkd_loss_sums + backward. peer: transformers
           thinker + PEFT, teacher = the same model under disable_adapter(), TRL 1.16
           GKDTrainer.compute_loss line for line (student then teacher full-sequence logits, shift,
           GKDTrainer.generalized_jsd_loss with labels masking the prompt, temperature passed as
           ms-swift does) with the media passed to both forwards (TRL itself passes only ids and mask;
           ms-swift passes the media) + backward + AdamW; on-policy: GKDTrainer.generate_on_policy_outputs
           first, its model.generate given the media. Checked first: loss and LoRA grad norm, both stacks.
  reuse    our off-policy step with the same media on both sides (one tower pass) vs teacher_media a
           distinct but equal MediaInputs (a second pass for the student): s/step and the fraction saved;
           tower calls counted and the two losses compared; its own interleaved loop (--reuse-reps),
           with one encode_media call timed beside it as the yardstick. Then selfkd.train_step
           on-policy with the step's tower outputs handed to generation (as train_step does) vs
           generation running the towers itself.
  memory   peak RSS (Linux VmHWM) of each variant in a FRESH subprocess: imports, load, reset the
           high-water mark (/proc/self/clear_refs), one call; the peak during the call and the loading peak.
--profile adds torch.profiler's top ops of one off-policy step per side.

Timing: repetitions of all variants interleaved in one process, order rotating each rep; medians;
ratio = peer / selfkd (> 1: selfkd faster), memory ratio = selfkd / peer (peaks during the call; the
peer's "loaded" RSS leaves out weights transformers maps from the safetensors files and reads on first use).
torch threads 1 by default: on a 2-core machine shared with other jobs, two threads wait on each other at
every op and run 4-8x slower (pass --threads 2 on a quiet machine).

Sampling on both sides: T 2.0, top_k 0, top_p 1, exactly --completion tokens (no eos can stop a row).
A sampled <|image_pad|> or <|audio_pad|> would make the prompt + completion forward count more
placeholders than there are media (both stacks raise). selfkd.sample_completions never samples them;
the peer's completions and the bare step's get such ids replaced by a text id (an elementwise op).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench_gkd import med, parse_only  # noqa: E402

SECTIONS = ("forward", "step", "reuse", "memory")
MEMORY_VARIANTS = ("fwd-selfkd", "fwd-peer", "selfkd-off", "peer-off", "selfkd-on", "peer-on")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the step section (median reported)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads. 1: on a 2-core machine shared with other jobs, 2 threads wait on "
                        "each other at every op (4-8x slower); pass 2 on a quiet machine")
    p.add_argument("--hidden", type=int, default=256, help="LM hidden size (heads x 32 = hidden)")
    p.add_argument("--layers", type=int, default=4, help="LM layers")
    p.add_argument("--real-towers", action="store_true", help="towers at the released widths")
    p.add_argument("--tower-layers", type=int, default=None,
                   help="layers of each tower (default: audio 2, vision 3)")
    p.add_argument("--batch", type=int, default=2, help="rows (each: one image + one clip)")
    p.add_argument("--image", type=int, default=448, help="image side in pixels")
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--completion", type=int, default=64, help="completion tokens per row")
    p.add_argument("--forward-reps", type=int, default=5, help="repetitions of the forward section")
    p.add_argument("--reuse-reps", type=int, default=5, help="repetitions of the tower-reuse comparison")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one off-policy step per side")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--mem-wait", type=float, default=600.0,
                   help="seconds to wait for enough free memory before a peer variant (shared machine)")
    p.add_argument("--ckpt-dir", default=None, help="where the random checkpoint is cached (default /tmp)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one memory variant
    a = p.parse_args(argv)
    a.only = parse_only(p, a.only, SECTIONS)
    return a


# ----------------------------------------------------------------------------------------------
# Model, checkpoint, the two stacks


def model_config(a):
    from model_qwen3omni import ThinkerConfig
    from towers import AudioConfig, VisionConfig

    h = a.hidden
    if a.real_towers:
        audio = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, downsample_hidden_size=480)
        vision = dict(hidden_size=1152, num_heads=16, intermediate_size=4304)
    else:
        audio = dict(d_model=512, encoder_attention_heads=8, encoder_ffn_dim=2048, downsample_hidden_size=128)
        vision = dict(hidden_size=512, num_heads=8, intermediate_size=2048)
    a_layers = a.tower_layers or 2
    v_layers = a.tower_layers or 3
    audio_cfg = AudioConfig(encoder_layers=a_layers, output_dim=h, **audio)
    vision_cfg = VisionConfig(depth=v_layers, out_hidden_size=h, deepstack_visual_indexes=list(range(min(3, v_layers))),
                              **vision)
    return ThinkerConfig(vocab_size=152064, hidden_size=h, num_hidden_layers=a.layers, num_attention_heads=h // 32,
                         num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=128, intermediate_size=768, norm_topk_prob=True, rms_norm_eps=1e-6,
                         rope_theta=1_000_000.0, max_position_embeddings=4096, audio_config=audio_cfg,
                         vision_config=vision_cfg)


def ckpt_path(a, cfg):
    ac, vc = cfg.audio_config, cfg.vision_config
    tag = (f"omni-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-e{cfg.num_experts}k{cfg.num_experts_per_tok}-"
           f"a{ac.d_model}x{ac.encoder_layers}c{ac.downsample_hidden_size}-v{vc.hidden_size}x{vc.depth}")
    return os.path.join(a.ckpt_dir or os.path.join("/tmp", "selfkd_bench"), tag)


def ensure_checkpoint(a, cfg, log=print):
    from bench_gkd import cached_checkpoint
    from tiny import write_random_checkpoint

    return cached_checkpoint(ckpt_path(a, cfg),
                             lambda tmp: write_random_checkpoint(cfg, tmp, seed=0, dtype=torch.float32, std=0.02), log)


def load_ours(a, path):
    from bench_gkd import randomize_lora_B_
    from lora import inject_lora, lora_parameters
    from weights import load_thinker

    model = load_thinker(path, dtype=torch.float32, towers=True)
    inject_lora(model, rank=8, alpha=16, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj,experts", seed=0)
    for _, p in lora_parameters(model):  # as selfkd.build_student does
        p.data = p.data.to(dtype=torch.float32)
    randomize_lora_B_(model)
    return model.train()


def adapter_dir(a, cfg, ours):
    """Our LoRA weights as a PEFT adapter (written when `ours` is given; the memory workers read it)."""
    from lora import save_adapter

    d = ckpt_path(a, cfg) + "-adapter"
    if ours is not None:
        save_adapter(ours, d)
    return d


def load_peer(a, path, adapter):
    from peft import PeftModel
    from transformers import Qwen3OmniMoeForConditionalGeneration

    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    thinker = full.thinker
    del full
    return PeftModel.from_pretrained(thinker, adapter, is_trainable=True).train()


def lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Media and prompts (media.py + data.py, as the trainer builds them)


def synthetic_image(side, seed):
    """uint8 [3, side, side]: smooth colour gradients and stripes plus noise (something to resize)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    f = 3 + seed
    img = torch.stack([x, y, 0.5 + 0.5 * torch.sin(2 * torch.pi * f * (x + y))]) * 200
    img = img + 30 * torch.rand(3, side, side, generator=g)
    return img.clamp(0, 255).to(torch.uint8)


def synthetic_wave(seconds, seed):
    """float32 [seconds * 16000]: a chirp, two harmonics and noise."""
    import media

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * media.SAMPLING_RATE)) / media.SAMPLING_RATE
    f0 = 150 + 50 * seed
    wave = 0.3 * torch.sin(2 * torch.pi * (f0 + 40 * t) * t) + 0.1 * torch.sin(2 * torch.pi * 3 * f0 * t)
    return (wave + 0.02 * torch.randn(t.shape, generator=g)).numpy()


def make_batch(a, cfg):
    """-> (chat.Batch with ONE shared MediaInputs, completion ids/mask are the dataset completion)."""
    import media
    from chat import EncodedExample, collate, media_span
    from data import Media
    from tiny import QWEN_TOKEN_IDS

    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(1000, 150000, (n,), generator=g).tolist()  # noqa: E731
    ids = dict(QWEN_TOKEN_IDS)
    rows = []
    for r in range(a.batch):
        pixels, grid = media.image_patches(synthetic_image(a.image, r))
        image = Media("image", f"synthetic-{r}.png", pixels=pixels, grid_thw=grid)
        sound = Media("audio", f"synthetic-{r}.wav", features=media.log_mel(synthetic_wave(a.audio_seconds, r)),
                      seconds=a.audio_seconds)
        items = [image, sound] if r % 2 == 0 else [sound, image]
        lead = [ids["<|im_start|>"]] + text(10 + 12 * r)
        prompt = lead + media_span(items[0], ids) + text(6) + media_span(items[1], ids) + text(5 + 3 * r) + \
            [ids["<|im_end|>"], ids["<|im_start|>"]] + text(2)
        rows.append(EncodedExample(prompt, prompt, text(a.completion), items, items))
    return collate(rows, pad_id=0)


def hf_media(mi):
    """MediaInputs -> transformers' keyword arguments (same tensors; audio padded per clip)."""
    kw = {}
    if mi.pixel_values is not None:
        kw.update(pixel_values=mi.pixel_values, image_grid_thw=mi.image_grid_thw)
    if mi.input_features is not None:
        lens = mi.audio_feature_lens.tolist()
        clips = mi.input_features.split(lens, dim=1)
        feats = torch.zeros(len(lens), mi.input_features.shape[0], max(lens))
        fmask = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, (c, n) in enumerate(zip(clips, lens)):
            feats[i, :, :n] = c
            fmask[i, :n] = 1
        kw.update(input_features=feats, feature_attention_mask=fmask)
    return kw


def media_ids(cfg):
    return torch.tensor([cfg.audio_token_id, cfg.image_token_id, cfg.video_token_id, cfg.audio_start_token_id,
                         cfg.audio_end_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id])


def scrub(ids, cfg):
    """Sampled media marker/placeholder ids -> a plain text id (see the module docstring)."""
    return ids.masked_fill(torch.isin(ids, media_ids(cfg).to(ids.device)), 1000)


# ----------------------------------------------------------------------------------------------
# One step, each side


def selfkd_sample(a, cfg, model, batch, generator):
    from selfkd import sample_completions

    ids, mask = sample_completions(model, batch.student_prompt_ids, batch.student_prompt_mask, generator,
                                   max_new_tokens=a.completion, temperature=a.temperature, top_k=0, top_p=1.0,
                                   eos_ids=[cfg.vocab_size], pad_id=0, gather=False, media_inputs=batch.student_media)
    return scrub(ids, cfg), mask


def selfkd_step(a, cfg, model, opt, batch, on_policy, generator=None, do_step=True):
    """-> loss (float): what selfkd.train_step does for one micro-batch, without DeepSpeed."""
    from bench_gkd import Engine, backward_and_step
    from selfkd import gkd_loss_sums

    cids, cmask = batch.completion_ids, batch.completion_mask
    if on_policy:
        cids, cmask = selfkd_sample(a, cfg, model, batch, generator)
    jsd, _, n = gkd_loss_sums(Engine(model), batch, cids, cmask, a.beta, a.temperature, with_sft=False)
    return backward_and_step(jsd / max(n, 1), opt, do_step)


class WithMedia:
    """What TRL's generate_on_policy_outputs calls `model`: its generate gets the prompts' media too."""

    def __init__(self, model, media_kw):
        self.model, self.media_kw = model, media_kw

    def generate(self, **kwargs):
        return self.model.generate(**kwargs, **self.media_kw)


def peer_inputs(batch):
    """bench_gkd's peer inputs (prompt + completion, labels masking the prompt, the prompts for generate)."""
    from types import SimpleNamespace

    from bench_gkd import peer_inputs as text_inputs

    return text_inputs(SimpleNamespace(prompt_ids=batch.student_prompt_ids, prompt_mask=batch.student_prompt_mask,
                                       completion_ids=batch.completion_ids, completion_mask=batch.completion_mask))


def peer_step(a, cfg, peft_model, opt, batch, media_kw, on_policy, do_step=True):
    from bench_gkd import backward_and_step, peer_compute_loss, peer_generation_config, shared_teacher
    from trl.experimental.gkd import GKDTrainer

    inputs = peer_inputs(batch)
    if on_policy:
        ids, mask, labels = GKDTrainer.generate_on_policy_outputs(WithMedia(peft_model, media_kw), inputs,
                                                                  peer_generation_config(a))
        P = inputs["prompts"].shape[1]
        ids = torch.cat([ids[:, :P], scrub(ids[:, P:], cfg)], dim=1)  # the completion only
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss = peer_compute_loss(a, peft_model, shared_teacher(peft_model), inputs, media_kw)
    return backward_and_step(loss, opt, do_step)


def two_pass_batch(batch):
    """The same media for the teacher, but as a distinct (equal) MediaInputs: tower_outputs runs twice."""
    return dataclasses.replace(batch, teacher_media=copy.deepcopy(batch.student_media))


class TowerCalls:
    """Counts the calls of our towers' forward."""

    def __init__(self, model):
        self.n = 0
        self.handles = [t.register_forward_pre_hook(self._hook) for t in (model.audio_tower, model.visual)]

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Memory: RSS high-water mark (bench_gkd's helpers), fresh subprocess per variant


def mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def peer_step_estimate_gib(a, cfg, batch):
    """A generous guess at the peer step's peak: ~16 float32 [rows, vocab] arrays + the models."""
    rows = batch.student_prompt_ids.numel() + batch.completion_ids.numel()
    return 16 * rows * cfg.vocab_size * 4 / 2**30 + 2.0


def wait_for_memory(need_gib, a, log, what):
    """On a shared machine, do not start a big variant without room for it (the kernel's OOM killer
    would pick the biggest process, maybe another job's)."""
    t = time.perf_counter()
    while mem_available_gib() < need_gib:
        if time.perf_counter() - t > a.mem_wait:
            log(f"  {what}: only {mem_available_gib():.1f} GiB available after {a.mem_wait:.0f} s, "
                f"{need_gib:.1f} GiB wanted: skipped")
            return False
        time.sleep(5)
    if time.perf_counter() - t > 1:
        log(f"  {what}: waited {time.perf_counter() - t:.0f} s for {need_gib:.1f} GiB of free memory")
    return True


def memory_worker(a, variant):
    from bench_gkd import measure_call, rss_gib

    torch.manual_seed(0)
    rss_imports = rss_gib()
    cfg = model_config(a)
    path = ckpt_path(a, cfg)
    batch = make_batch(a, cfg)
    out = {"variant": variant, "rss_imports_gib": rss_imports}
    on_policy = variant.endswith("-on")
    if "selfkd" in variant:
        from lora import lora_disabled

        model = load_ours(a, path)
        opt = torch.optim.AdamW(lora_params(model), lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        if variant == "fwd-selfkd":
            def run():
                with torch.no_grad(), lora_disabled(model):
                    return model(batch.student_prompt_ids, batch.student_prompt_mask,
                                 media_inputs=batch.student_media)
        else:
            run = lambda: selfkd_step(a, cfg, model, opt, batch, on_policy, gen)  # noqa: E731
    else:
        from peft import PeftModel  # noqa: F401  (imported before the baseline is taken)

        peer = load_peer(a, path, adapter_dir(a, cfg, None))
        opt = torch.optim.AdamW(lora_params(peer), lr=1e-5)
        kw = hf_media(batch.student_media)
        if variant == "fwd-peer":
            def run():
                with torch.no_grad(), peer.disable_adapter():
                    return peer(input_ids=batch.student_prompt_ids, attention_mask=batch.student_prompt_mask, **kw)
        else:
            run = lambda: peer_step(a, cfg, peer, opt, batch, kw, on_policy)  # noqa: E731
    measure_call(run, out)
    print("RESULT " + json.dumps(out), flush=True)


def run_memory(a, cfg, batch, results, log):
    from bench_gkd import run_worker

    log("\n## Peak memory (CPU RSS high-water mark, VmHWM; each variant in a fresh subprocess: imports, load, "
        "reset, one call)")
    need = peer_step_estimate_gib(a, cfg, batch)
    rows = {}
    for v in MEMORY_VARIANTS:
        if "peer" in v and not wait_for_memory(need, a, log, v):
            continue
        r = run_worker(__file__, v, log)
        if r is None:
            continue
        rows[v] = r
        log(f"{v:<11} peak during the call {r['hwm_step_gib']:5.2f} GiB (above the loaded process "
            f"{r['step_above_loaded_gib']:5.2f}); loading peak {r['hwm_load_gib']:5.2f}, loaded "
            f"{r['rss_loaded_gib']:5.2f} GiB; {r['seconds']:.1f} s")
    for o, p in (("fwd-selfkd", "fwd-peer"), ("selfkd-off", "peer-off"), ("selfkd-on", "peer-on")):
        if o in rows and p in rows:
            log(f"  {o} / {p}: peak during the call {rows[o]['hwm_step_gib'] / rows[p]['hwm_step_gib']:.3f}x")
    log("  (transformers maps the safetensors weights and reads them on first use, so its 'loaded' RSS excludes most "
        "weights and 'above loaded' includes them: compare the peaks during the call)")
    results["memory"] = rows


# ----------------------------------------------------------------------------------------------
# Sections


def interleaved(fns, reps, log, label):
    """{name: [seconds]} with the order rotating each rep."""
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
        log(f"  {label} rep {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def run_forward(a, cfg, ours, peer, batch, kw, results, log):
    from lora import lora_disabled

    ids, mask, mi = batch.student_prompt_ids, batch.student_prompt_mask, batch.student_media
    hf = peer.get_base_model()
    log(f"\n## Omni forward: towers + LM -> logits [{ids.shape[0]}, {ids.shape[1]}, {cfg.vocab_size}], no_grad, "
        "LoRA off; and the towers alone")

    def ours_fwd():
        with torch.no_grad(), lora_disabled(ours):
            return ours(ids, mask, media_inputs=mi)

    def peer_fwd():
        with torch.no_grad(), peer.disable_adapter():
            return peer(input_ids=ids, attention_mask=mask, **kw).logits

    def ours_towers():
        with torch.no_grad():
            return ours.encode_media(mi)

    def peer_towers():
        with torch.no_grad():
            audio = hf.model.get_audio_features(kw["input_features"], kw["feature_attention_mask"])
            image = hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
            return audio, image

    # check (and warm-up)
    lo, lp = ours_fwd(), peer_fwd()
    real = mask.bool()
    diff = (lo - lp)[real].abs().max().item()
    scale = lp[real].abs().max().item()
    to, (pa, pi) = ours_towers(), peer_towers()
    tdiff = {"audio": (to[0].embeds - pa.last_hidden_state).abs().max().item(),
             "image": (to[1].embeds - torch.cat(pi.pooler_output)).abs().max().item(),
             "deepstack": max((x - torch.cat(y)).abs().max().item() for x, y in zip(to[1].deepstack,
                                                                                   pi.deepstack_features))}
    log(f"check: logits max |selfkd - HF| {diff:.2e} (max |logit| {scale:.2f}); towers max |diff| audio "
        f"{tdiff['audio']:.2e}, image {tdiff['image']:.2e}, deepstack {tdiff['deepstack']:.2e}")
    del lo, lp
    fns = {"selfkd forward": ours_fwd, "HF forward": peer_fwd, "selfkd towers": ours_towers,
           "HF towers": peer_towers}
    times = interleaved(fns, a.forward_reps, log, "forward")
    rows = {n: {"median_s": med(t), "times": t} for n, t in times.items()}
    for n in fns:
        log(f"{n:<16} median {rows[n]['median_s']:.3f} s {[round(x, 2) for x in times[n]]}")
    for o, p in (("selfkd forward", "HF forward"), ("selfkd towers", "HF towers")):
        log(f"  {p} / {o}: {rows[p]['median_s'] / rows[o]['median_s']:.2f}x")
    results["forward"] = {"rows": rows, "logits_max_diff": diff, "logits_max_abs": scale, "tower_max_diff": tdiff}


def run_step(a, cfg, ours, peer, batch, kw, results, log):
    from bench_gkd import grad_norm

    do_step = "step" in a.only
    do_reuse = "reuse" in a.only
    tok = batch.completion_ids.numel()
    log(f"\n## Multimodal GKD step (batch {a.batch}, prompt {batch.student_prompt_ids.shape[1]} (left-padded), "
        f"completion {a.completion}: {tok} completion tokens; beta {a.beta}, T {a.temperature}; AdamW)")
    oopt = torch.optim.AdamW(lora_params(ours), lr=1e-5)
    popt = torch.optim.AdamW(lora_params(peer), lr=1e-5) if peer is not None else None
    two = two_pass_batch(batch)
    # checks (also the warm-up): same loss and LoRA gradient norm before any update; reuse: same loss, tower calls
    calls = TowerCalls(ours)
    t = time.perf_counter()
    lo = selfkd_step(a, cfg, ours, oopt, batch, False, do_step=False)
    go = grad_norm(lora_params(ours))
    one_calls = calls.n
    oopt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    calls.n = 0
    l2 = selfkd_step(a, cfg, ours, oopt, two, False, do_step=False)
    two_calls = calls.n
    calls.remove()
    oopt.zero_grad(set_to_none=True)
    check = {"loss_selfkd": lo, "grad_norm_selfkd": go, "loss_selfkd_two_pass": l2,
             "tower_calls_one_pass": one_calls, "tower_calls_two_pass": two_calls}
    log(f"check reuse: tower calls per step {one_calls} (shared MediaInputs) vs {two_calls} (equal copy); "
        f"loss {lo:.9g} vs {l2:.9g} ({'bit-identical' if lo == l2 else f'rel diff {abs(lo - l2) / abs(lo):.1e}'})")
    t2 = time.perf_counter()
    if do_step:
        lp = peer_step(a, cfg, peer, popt, batch, kw, False, do_step=False)
        gp = grad_norm(lora_params(peer))
        popt.zero_grad(set_to_none=True)
        check.update(loss_peer=lp, grad_norm_peer=gp, loss_rel_diff=abs(lo - lp) / abs(lp),
                     grad_rel_diff=abs(go - gp) / gp)
        log(f"check (off-policy, fp32, before any update): loss selfkd {lo:.9f} peer {lp:.9f} (rel diff "
            f"{check['loss_rel_diff']:.2e}); LoRA grad norm selfkd {go:.6e} peer {gp:.6e} (rel diff "
            f"{check['grad_rel_diff']:.2e}); warm-up s: selfkd {t1 - t:.1f}, peer {time.perf_counter() - t2:.1f}")
    results["check"] = check

    from types import SimpleNamespace

    from bench_gkd import selfkd_engine, selfkd_train_step

    gen = torch.Generator().manual_seed(0)
    engine = selfkd_engine(load_ours(a, ckpt_path(a, cfg)), "float32", a.batch)
    data = SimpleNamespace(batch=batch)
    selfkd_train_step(a, cfg, engine, data, False)  # warm-up of the engine
    if do_step:
        fns = {"selfkd-off": lambda: selfkd_train_step(a, cfg, engine, data, False),
               "peer-off": lambda: peer_step(a, cfg, peer, popt, batch, kw, False),
               "selfkd-on": lambda: selfkd_train_step(a, cfg, engine, data, True, gen),
               "peer-on": lambda: peer_step(a, cfg, peer, popt, batch, kw, True)}
        times = interleaved(fns, a.reps, log, "step")
        rows = {n: {"median_s": med(t), "tokens_per_s": tok / med(t), "times": t} for n, t in times.items()}
        for n in fns:
            log(f"{n:<11} median {rows[n]['median_s']:.3f} s  {rows[n]['tokens_per_s']:6.1f} completion tokens/s "
                f"{[round(x, 2) for x in times[n]]}")
        for b in ("off", "on"):
            log(f"  {b}-policy: peer / selfkd time = "
                f"{rows[f'peer-{b}']['median_s'] / rows[f'selfkd-{b}']['median_s']:.2f}x")
        results["step"] = rows
    if do_reuse:
        log(f"\n## Tower reuse: selfkd off-policy step, towers once (collate's shared MediaInputs) vs twice "
            f"(teacher_media an equal copy); {a.reuse_reps} interleaved reps, with one encode_media call as the "
            "yardstick")

        def towers():
            with torch.no_grad():
                return ours.encode_media(batch.student_media)

        fns = {"one pass": lambda: selfkd_step(a, cfg, ours, oopt, batch, False),
               "two passes": lambda: selfkd_step(a, cfg, ours, oopt, two, False),
               "encode_media": towers}
        times = interleaved(fns, a.reuse_reps, log, "reuse")
        rows = {n: {"median_s": med(t), "times": t} for n, t in times.items()}
        for n in fns:
            log(f"{n:<13} median {rows[n]['median_s']:.3f} s {[round(x, 2) for x in times[n]]}")
        one, two_s, tw = (rows[n]["median_s"] for n in fns)
        # paired per rep as well: the two steps of one rep ran back to back
        paired = med([t2 - t1 for t1, t2 in zip(times["one pass"], times["two passes"])])
        log(f"  saved per step: {two_s - one:.3f} s (medians; paired per rep {paired:.3f} s) = "
            f"{(two_s - one) / two_s:.1%} of the two-pass step; one encode_media call: {tw:.3f} s")
        results["reuse"] = dict(rows=rows, saved_s=two_s - one, saved_paired_s=paired,
                                saved_frac=(two_s - one) / two_s)
        log(f"\n## Tower reuse in sampling: selfkd.train_step on-policy, the step's tower outputs handed to "
            f"generation (as train_step does) vs generation running the towers itself; {a.reuse_reps} reps")
        fns = {"handed": lambda: selfkd_train_step(a, cfg, engine, data, True, gen),
               "run again": lambda: selfkd_train_step(a, cfg, engine, data, True, gen, reuse_towers=False)}
        times = interleaved(fns, a.reuse_reps, log, "sampling reuse")
        handed, again = med(times["handed"]), med(times["run again"])
        log(f"handed     median {handed:.3f} s {[round(x, 2) for x in times['handed']]}\n"
            f"run again  median {again:.3f} s {[round(x, 2) for x in times['run again']]}\n"
            f"  saved per on-policy step: {again - handed:.3f} s = {(again - handed) / again:.1%}")
        results["sampling_reuse"] = dict(handed_s=handed, run_again_s=again, saved_frac=(again - handed) / again)


def run_profile(a, cfg, ours, peer, batch, kw, log):
    from torch.profiler import ProfilerActivity, profile

    oopt = torch.optim.AdamW(lora_params(ours), lr=1e-5)
    popt = torch.optim.AdamW(lora_params(peer), lr=1e-5)
    for name, fn in (("selfkd-off", lambda: selfkd_step(a, cfg, ours, oopt, batch, False)),
                     ("peer-off", lambda: peer_step(a, cfg, peer, popt, batch, kw, False))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        log(f"\n--- torch.profiler, {name}: top ops by self CPU time ---")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))


def summary(a, cfg, results, log):
    log("\n## Summary (time ratio = peer / selfkd, > 1: selfkd faster; memory ratio = selfkd / peer)")
    log("| what | selfkd | transformers + peft + TRL | ratio |")
    log("|---|---:|---:|---:|")
    f = results.get("forward")
    if f:
        r = f["rows"]
        for o, p, what in (("selfkd forward", "HF forward", "omni forward (towers + LM, logits), s"),
                           ("selfkd towers", "HF towers", "towers alone (audio + vision), s")):
            log(f"| {what} | {r[o]['median_s']:.3f} | {r[p]['median_s']:.3f} | "
                f"{r[p]['median_s'] / r[o]['median_s']:.2f}x |")
    s = results.get("step")
    if s:
        for b in ("off", "on"):
            if f"peer-{b}" in s:
                o, p = s[f"selfkd-{b}"], s[f"peer-{b}"]
                log(f"| GKD step {b}-policy, s | {o['median_s']:.2f} | {p['median_s']:.2f} | "
                    f"{p['median_s'] / o['median_s']:.2f}x |")
    u = results.get("reuse")
    if u:
        one, two = u["rows"]["one pass"]["median_s"], u["rows"]["two passes"]["median_s"]
        log(f"| selfkd off-policy step, towers once vs twice, s | {one:.2f} | ({two:.2f}, two passes) | "
            f"{u['saved_frac']:.0%} saved |")
    r = results.get("sampling_reuse")
    if r:
        log(f"| selfkd on-policy step, tower outputs handed to sampling vs run again, s | {r['handed_s']:.2f} | "
            f"({r['run_again_s']:.2f}, run again) | {r['saved_frac']:.0%} saved |")
    m = results.get("memory")
    if m:
        for o, p, what in (("fwd-selfkd", "fwd-peer", "forward"), ("selfkd-off", "peer-off", "step off-policy"),
                           ("selfkd-on", "peer-on", "step on-policy")):
            if o in m and p in m:
                log(f"| peak RSS during the {what}, GiB | {m[o]['hwm_step_gib']:.2f} | {m[p]['hwm_step_gib']:.2f} | "
                    f"{m[o]['hwm_step_gib'] / m[p]['hwm_step_gib']:.2f}x |")


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the step runs on selfkd's DeepSpeed engine; before it is imported
    import selfkd  # noqa: F401

    if a.worker:
        return memory_worker(a, a.worker)
    t_start = time.perf_counter()
    results = {"argv": sys.argv}

    def log(msg):
        print(msg, flush=True)

    import platform

    import peft
    import transformers
    import trl

    cfg = model_config(a)
    ac, vc = cfg.audio_config, cfg.vision_config
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    log(f"# bench_omni  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} CPU, {os.cpu_count()} cores, torch "
        f"threads {torch.get_num_threads()}; load average {' '.join(load)}; {mem_available_gib():.1f} GiB available")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}")
    log(f"LM: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads x {cfg.head_dim}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, "
        f"intermediate {cfg.moe_intermediate_size}, vocab {cfg.vocab_size}; audio tower {ac.encoder_layers} layers x "
        f"{ac.d_model} (ffn {ac.encoder_ffn_dim}, conv {ac.downsample_hidden_size}); vision tower {vc.depth} blocks x "
        f"{vc.hidden_size} (mlp {vc.intermediate_size}, deepstack {vc.deepstack_visual_indexes}); fp32; LoRA r8 "
        "alpha16 dropout 0 on q,k,v,o + experts, towers frozen")
    path = ensure_checkpoint(a, cfg, log)
    batch = make_batch(a, cfg)
    mi = batch.student_media
    log(f"media per row: one {a.image}x{a.image} image ({int(mi.image_grid_thw[0].prod())} patches, "
        f"{int(mi.image_grid_thw[0].prod()) // 4} tokens) + one {a.audio_seconds:g} s clip "
        f"({int(mi.audio_feature_lens[0])} frames); batch {a.batch}: prompts {batch.student_prompt_ids.shape[1]} "
        f"tokens wide ({batch.student_prompt_mask.sum(-1).tolist()} real), completion {a.completion}")
    results["shapes"] = {"prompt_width": batch.student_prompt_ids.shape[1],
                         "prompt_tokens": batch.student_prompt_mask.sum(-1).tolist(), "completion": a.completion}
    if any(s in a.only for s in ("forward", "step", "reuse")):
        t = time.perf_counter()
        ours = load_ours(a, path)
        adapter = adapter_dir(a, cfg, ours)
        peer = None
        if any(s in a.only for s in ("forward", "step")) or a.profile:
            if not wait_for_memory(peer_step_estimate_gib(a, cfg, batch) + 1.0, a, log, "forward/step sections"):
                return
            peer = load_peer(a, path, adapter)
        kw = hf_media(mi)
        log(f"loaded ({time.perf_counter() - t:.1f} s); trainable LoRA params: selfkd "
            f"{sum(p.numel() for p in lora_params(ours)):,}"
            + (f", peft {sum(p.numel() for p in lora_params(peer)):,}" if peer is not None else ""))
        if "forward" in a.only:
            run_forward(a, cfg, ours, peer, batch, kw, results, log)
        if "step" in a.only or "reuse" in a.only:
            run_step(a, cfg, ours, peer, batch, kw, results, log)
        if a.profile and peer is not None:
            run_profile(a, cfg, ours, peer, batch, kw, log)
        del ours, peer
    else:
        adapter_dir(a, cfg, load_ours(a, path))  # the memory workers read it
    if "memory" in a.only:
        run_memory(a, cfg, batch, results, log)
    summary(a, cfg, results, log)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    log(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end {' '.join(load)}; command: "
        + " ".join([os.path.relpath(sys.executable), os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
