"""GKD step benchmark: selfkd vs the Hugging Face stack, same weights, same data, same seed.

    .venv/bin/python bench/bench_gkd.py [--reps 3] [--only step,memory,loss,gen] [--profile]
    .venv/bin/python bench/bench_gkd.py --device cuda --dtype bfloat16 --real-width --layers 4   # GPU

Model (CPU default): the Qwen3-Omni thinker text path at toy width -- hidden 256, 4 layers,
8 heads / 2 kv heads, head_dim 32, 16 experts top-4, expert intermediate 128, vocab 152064
(the real vocabulary, so the vocab-wide loss has its real cost). --real-width: hidden 2048,
32/4 heads, head_dim 128, 128 experts top-8, intermediate 768 (--layers of them).
The weights come from one tiny transformers Qwen3OmniMoeForConditionalGeneration
(tests/hf_models.hf_full_model) written with save_pretrained: ours is load_thinker(path), the
peer is transformers' Qwen3OmniMoeThinkerForConditionalGeneration from_pretrained(path).thinker.
LoRA r8 alpha16 dropout 0 on q,k,v,o and the experts on both sides; its B is randomised (so the
student differs from the teacher) and PEFT loads OUR adapter file, so the LoRA weights match too.

selfkd   the trainer's own step, selfkd.train_step, on the DeepSpeed engine that `selfkd.py` builds
         on one process (the zero3 preset resolved for world size 1: ZeRO-2; AdamW as train() makes
         it; gradient clipping 1.0): selfkd.gkd_loss_sums (teacher pass under no_grad +
         lora_disabled returning hidden states, student pass, chunked_jsd_loss_sum on the completion
         positions only), engine.backward, engine.step; on-policy: selfkd.sample_completions first.
         It runs on a second copy of the model (DeepSpeed's hooks take over its LoRA gradients).
bare     the same arithmetic without the engine: gkd_loss_sums, backward, torch AdamW (on-policy:
         generate.generate + generate.sample_next first); "selfkd / bare" is what the engine
         and train_step's bookkeeping cost. The memory section measures this bare loop.
peer     transformers thinker + peft LoRA (teacher = `with peft_model.disable_adapter()`),
         TRL 1.16 GKDTrainer.compute_loss (student, then teacher full-sequence logits, shift,
         GKDTrainer.generalized_jsd_loss over all positions with labels masking the prompt) with
         temperature passed (as ms-swift does), backward, AdamW step; on-policy:
         GKDTrainer.generate_on_policy_outputs (HF generate with KV cache) first.
peer-2T  the peer with a separate full teacher copy (what TRL's GKDTrainer needs): memory only.

Sampling on both sides: temperature 2.0, top_k 0, top_p 1.0, exactly --completion tokens
(no eos can stop a row: HF min_new_tokens + eos None, ours an eos id >= vocab).

Sections (--only): step (GKD step times, interleaved, + FLOP count and matmul peak),
memory (peak RSS of each variant in a FRESH subprocess; on CUDA max_memory_allocated in-process),
loss (chunked loss vs TRL's formula on materialised fp32 logits, via bench/bench_loss.py's
functions), gen (generate tokens/s, ours vs HF, with and without LoRA).
Timing repetitions of all variants are interleaved in one process (the order rotates each rep);
medians and ratios (peer time / selfkd time, > 1 = selfkd faster) are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]
if "--src" in sys.argv:  # a prototype copy of selfkd.py / model_qwen3omni.py / lora.py / data.py goes first
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--src") + 1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SECTIONS = ("step", "memory", "loss", "gen", "moe")
DEFAULT_SECTIONS = ("step", "memory", "loss", "gen")  # moe: for the GPU (on CPU bench/bench_moe.py covers it)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--moe-tokens", type=int, default=2048, help="tokens through the MoE block (section moe)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--real-width", action="store_true", help="hidden 2048, 128 experts top-8, intermediate 768")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens per row")
    p.add_argument("--completion", type=int, default=64, help="completion tokens per row")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--loss-rows", type=int, default=640, help="rows of the loss-alone benchmark")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="chunk_size of the loss-alone run (default: chunked_jsd_loss_sum's own default)")
    p.add_argument("--mm-size", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 CUDA)")
    p.add_argument("--no-gc-row", action="store_true", help="skip the selfkd gradient-checkpointing row")
    p.add_argument("--compile-decode", action="store_true",
                   help="step section: add the on-policy train_step with a compiled decode step (--compile_decode true)")
    p.add_argument("--mem-warmup", action="store_true",
                   help="memory workers run one untimed step before the measured one (all variants alike)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one step of each variant")
    p.add_argument("--ckpt-dir", default=None, help="where the random checkpoint is cached")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--src", default=None, help="import selfkd/model_qwen3omni/lora/data from this directory "
                                               "(a prototype copy) instead of the repository")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one memory variant
    a = p.parse_args(argv)
    if a.loss_chunk is None:
        import inspect

        from loss import chunked_jsd_loss_sum
        a.loss_chunk = inspect.signature(chunked_jsd_loss_sum).parameters["chunk_size"].default
    a.only = parse_only(p, a.only, SECTIONS)
    return a


def parse_only(parser, only: str, sections) -> list[str]:
    """--only's comma list, each name one of `sections` (else argparse's error)."""
    names = [s.strip() for s in only.split(",") if s.strip()]
    bad = [s for s in names if s not in sections]
    if bad:
        parser.error(f"--only: unknown section(s) {bad}; choose from {sections}")
    return names


# ----------------------------------------------------------------------------------------------
# Setup: config, checkpoint, the two models


def model_config(a):
    from model_qwen3omni import ThinkerConfig

    if a.real_width:
        width = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, moe_intermediate_size=768)
    else:
        width = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=16,
                     num_experts_per_tok=4, moe_intermediate_size=128)
    return ThinkerConfig(vocab_size=152064, num_hidden_layers=a.layers, intermediate_size=768, norm_topk_prob=True,
                         rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=4096, **width)


def ckpt_path(a, cfg):
    tag = f"h{cfg.hidden_size}-l{cfg.num_hidden_layers}-e{cfg.num_experts}k{cfg.num_experts_per_tok}-" \
          f"i{cfg.moe_intermediate_size}-v{cfg.vocab_size}" + ("-bf16" if a.dtype == "bfloat16" else "")
    return os.path.join(a.ckpt_dir or os.path.join("/tmp", "selfkd_bench"), tag)


def ensure_checkpoint(a, cfg, log=print):
    """transformers' full Qwen3-Omni (tiny towers) with `cfg` as its thinker text config, saved once."""
    def write(tmp):
        from hf_models import hf_full_model

        build_device = a.device if a.real_width else "cpu"  # real width: initialise on the GPU, not 12 GB on CPU
        with torch.device(build_device):
            hf = hf_full_model(cfg, seed=0)
        hf.to(torch.bfloat16 if a.dtype == "bfloat16" else torch.float32).save_pretrained(tmp)
        del hf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return cached_checkpoint(ckpt_path(a, cfg), write, log)


def run_worker(script, variant, log):
    """One memory variant in a fresh `script --worker variant` process (this run's other flags):
    its RESULT row plus wall_s, or None (logged) when the worker failed."""
    cmd = [sys.executable, os.path.abspath(script), *strip_flags(sys.argv[1:]), "--worker", variant]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        log(f"  {variant}: worker failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
        return None
    return dict(json.loads(line[0][len("RESULT "):]), wall_s=time.perf_counter() - t)


def cached_checkpoint(path, write, log=print):
    """`path` if it holds a checkpoint, else write(tmp) into a temporary directory renamed to `path`
    (a crash never leaves a half-written one that a later run would take)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    t = time.perf_counter()
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
    log(f"wrote random checkpoint {path} ({time.perf_counter() - t:.1f} s)")
    return path


def torch_dtype(a):
    return torch.bfloat16 if a.dtype == "bfloat16" else torch.float32


def randomize_lora_B_(model, seed=1, std=0.05):
    """B = 0 would make the student equal to the teacher (zero loss, zero gradient)."""
    from lora import lora_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.copy_((std * torch.randn(p.shape, generator=g)).to(p.dtype))


def load_ours(a, path, cfg):
    from lora import inject_lora, lora_parameters
    from weights import load_thinker

    model = load_thinker(path, dtype=torch_dtype(a), device=a.device)
    inject_lora(model, rank=8, alpha=16, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj,experts", seed=0)
    for _, p in lora_parameters(model):  # as selfkd.build_student does
        p.data = p.data.to(device=a.device, dtype=torch_dtype(a))
    randomize_lora_B_(model)
    return model.train()


def adapter_dir(a, cfg, ours):
    from lora import save_adapter

    """Our LoRA weights as a PEFT adapter. Written afresh whenever `ours` is given (the memory workers,
    which pass None, read the one the parent process wrote in the same run)."""
    d = ckpt_path(a, cfg) + "-adapter"
    if ours is not None:
        save_adapter(ours, d)
    return d


def load_hf_thinker(a, path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch_dtype(a))
    thinker = full.thinker.to(a.device)
    del full
    return thinker


def load_peer(a, path, adapter):
    """transformers thinker + peft LoRA with OUR adapter's weights (r8, alpha16, dropout 0, q/k/v/o regex
    + target_parameters experts.gate_up_proj / experts.down_proj, towers excluded)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_hf_thinker(a, path), adapter, is_trainable=True)
    return peft_model.train()


def lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_data(a, cfg):
    from chat import Batch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size - 2, (a.batch, a.prompt), generator=g).to(a.device)
    completion = torch.randint(0, cfg.vocab_size - 2, (a.batch, a.completion), generator=g).to(a.device)
    ones = lambda t: torch.ones_like(t)  # noqa: E731  all rows full length (left padding would be all-zero)
    batch = Batch(student_prompt_ids=prompt, student_prompt_mask=ones(prompt), teacher_prompt_ids=prompt,
                  teacher_prompt_mask=ones(prompt), completion_ids=completion, completion_mask=ones(completion))
    return SimpleNamespace(prompt_ids=prompt, prompt_mask=ones(prompt), completion_ids=completion,
                           completion_mask=ones(completion), batch=batch)


def sync(a):
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# One GKD step, each side


class Engine:
    """What selfkd.gkd_loss_sums expects of the DeepSpeed engine: .module and a forward call."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def selfkd_generate(a, cfg, model, data, generator):
    """selfkd.sample_completions without the Config/tokenizer plumbing: eval mode, generate, sample_next."""
    from generate import generate

    was = model.training
    model.eval()
    try:
        return generate(model, data.prompt_ids, data.prompt_mask, a.completion, eos_ids=[cfg.vocab_size], pad_id=0,
                        temperature=a.temperature, generator=generator)
    finally:
        model.train(was)


def selfkd_engine(model, dtype: str, batch: int):
    """`model` (a second copy of ours, the same weights and LoRA) in the DeepSpeed engine `selfkd.py`
    builds on one process: selfkd.deepspeed_config for the zero3 preset at world size 1 (ZeRO-2), a
    1-rank process group (gloo on CPU, nccl on CUDA), AdamW as train() makes it."""
    import deepspeed

    from lora import lora_parameters
    from selfkd import Config, deepspeed_config, init_distributed

    run = Config(deepspeed="zero3", torch_dtype=dtype, per_device_train_batch_size=batch, learning_rate=1e-5,
                 lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    ds = deepspeed_config(run, getattr(torch, dtype), world_size=1)
    init_distributed(run)
    opt = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=run.learning_rate,
                            betas=(run.adam_beta1, run.adam_beta2), eps=run.adam_epsilon, weight_decay=run.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def selfkd_train_step(a, cfg, engine, data, on_policy, generator=None, times=None, reuse_towers=True, step=None):
    """selfkd.train_step: one optimizer step, as the training loop calls it. -> loss (float).
    reuse_towers=False makes sampling run the towers itself (what train_step did before it passed
    the step's tower outputs to sampling; bench_omni's reuse section)."""
    from selfkd import sample_completions, train_step

    def sample(prompt_ids, prompt_mask, media_inputs, media):  # exactly --completion tokens (no eos id < vocab)
        return sample_completions(engine, prompt_ids, prompt_mask, generator, max_new_tokens=a.completion,
                                  temperature=a.temperature, top_k=0, top_p=1.0, eos_ids=[cfg.vocab_size], pad_id=0,
                                  gather=True, media_inputs=media_inputs, media=media if reuse_towers else None,
                                  step=step)

    result = train_step(engine, [data.batch], "on-policy" if on_policy else "dataset", sample, a.beta,
                        a.temperature, 0.0, 1e-5)
    if times is not None and on_policy:
        times["gen"] = result["sample_seconds"]
    return result["jsd_sum"] / result["tokens"]


def selfkd_step(a, cfg, model, opt, data, on_policy, generator=None, times=None, do_step=True):
    """The bare step (no engine) -> loss (float). `times` gets the generation seconds."""
    from selfkd import gkd_loss_sums

    cids, cmask = data.completion_ids, data.completion_mask
    if on_policy:
        t = time.perf_counter()
        cids, cmask = selfkd_generate(a, cfg, model, data, generator)
        sync(a)
        if times is not None:
            times["gen"] = time.perf_counter() - t
    jsd, _, n = gkd_loss_sums(Engine(model), data.batch, cids, cmask, a.beta, a.temperature, with_sft=False)
    return backward_and_step(jsd / max(n, 1), opt, do_step)


def backward_and_step(loss, opt, do_step):
    """The same for both sides: backward, then (unless timing the loss only) AdamW. -> loss"""
    loss.backward()
    if do_step:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def peer_generation_config(a):
    from transformers import GenerationConfig

    # TRL's GKDTrainer: GenerationConfig(max_new_tokens, temperature, do_sample=True, top_k=0, pad_token_id);
    # min_new_tokens + no eos: exactly --completion tokens, as on our side
    return GenerationConfig(max_new_tokens=a.completion, min_new_tokens=a.completion, temperature=a.temperature,
                            do_sample=True, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0, eos_token_id=None)


def peer_inputs(data):
    from chat import join_prompt_completion, labels_for

    ids, mask, start = join_prompt_completion(data.prompt_ids, data.prompt_mask, data.completion_ids,
                                              data.completion_mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels_for(ids, mask, start),
            "prompts": data.prompt_ids, "prompt_attention_mask": data.prompt_mask}


def peer_compute_loss(a, student, teacher, inputs, media_kw=None):
    """TRL 1.16 GKDTrainer.compute_loss, line for line, with temperature passed to the loss (ms-swift).
    `teacher` is a callable; for the shared base it runs the PEFT model under disable_adapter().
    `media_kw`: the media passed to both forwards (bench_omni; TRL itself passes only ids and mask,
    ms-swift passes the media)."""
    from trl.experimental.gkd import GKDTrainer

    media_kw = media_kw or {}
    student_outputs = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **media_kw)
    with torch.no_grad():
        teacher_outputs = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **media_kw)
    shifted_student_logits = student_outputs.logits[:, :-1, :]
    shifted_teacher_logits = teacher_outputs.logits[:, :-1, :]
    shifted_labels = inputs["labels"][:, 1:]
    return GKDTrainer.generalized_jsd_loss(student_logits=shifted_student_logits,
                                           teacher_logits=shifted_teacher_logits, labels=shifted_labels,
                                           beta=a.beta, temperature=a.temperature)


def shared_teacher(peft_model):
    def run(**kwargs):
        with peft_model.disable_adapter():
            return peft_model(**kwargs)
    return run


def separate_teacher(model):
    model.eval()  # TRL: self.teacher_model.eval()
    return lambda **kwargs: model(**kwargs)


def peer_step(a, peft_model, teacher, opt, data, on_policy, times=None, do_step=True):
    from trl.experimental.gkd import GKDTrainer

    inputs = peer_inputs(data)
    if on_policy:
        t = time.perf_counter()
        ids, mask, labels = GKDTrainer.generate_on_policy_outputs(peft_model, inputs, peer_generation_config(a))
        sync(a)
        if times is not None:
            times["gen"] = time.perf_counter() - t
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return backward_and_step(peer_compute_loss(a, peft_model, teacher, inputs), opt, do_step)


def grad_norm(params):
    return float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None)))


# ----------------------------------------------------------------------------------------------
# Memory: RSS high-water mark (Linux VmHWM, resettable through /proc/self/clear_refs)


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_gib():
    return _status_kib("VmRSS:") / 2**20


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class GpuPeak:
    def __init__(self, a):
        self.a = a

    def __enter__(self):
        sync(self.a)
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated() / 2**30
        return self

    def __exit__(self, *exc):
        sync(self.a)
        self.peak = torch.cuda.max_memory_allocated() / 2**30
        self.delta = self.peak - self.base


MEMORY_VARIANTS = ("selfkd-off", "selfkd-on", "selfkd-off-gc", "peer-off", "peer-on", "peer-2T-off",
                   "loss-selfkd", "loss-trl")


def memory_worker(a, variant):
    """Fresh process: imports -> load -> reset the RSS high-water mark -> one step -> peak. Prints JSON."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rss_imports = rss_gib()
    cfg = model_config(a)
    out = {"variant": variant, "rss_imports_gib": rss_imports}
    if variant.startswith("loss-"):
        inputs = loss_inputs(a, cfg)
        run = (lambda: loss_selfkd(inputs, a.loss_chunk)) if variant == "loss-selfkd" else (lambda: loss_trl(inputs))
    else:
        path = ckpt_path(a, cfg)
        data = make_data(a, cfg)
        on_policy = "-on" in variant
        if variant.startswith("selfkd"):
            model = load_ours(a, path, cfg)
            model.gradient_checkpointing = variant.endswith("-gc")
            opt = torch.optim.AdamW(lora_params(model), lr=1e-5)
            gen = torch.Generator(device=a.device).manual_seed(0)
            run = lambda: selfkd_step(a, cfg, model, opt, data, on_policy, gen)  # noqa: E731
        else:
            from peft import PeftModel  # noqa: F401  (imported before the baseline is taken)

            peft_model = load_peer(a, path, adapter_dir(a, cfg, None))
            teacher = separate_teacher(load_hf_thinker(a, path)) if "-2T" in variant else shared_teacher(peft_model)
            opt = torch.optim.AdamW(lora_params(peft_model), lr=1e-5)
            run = lambda: peer_step(a, peft_model, teacher, opt, data, on_policy)  # noqa: E731
    if a.mem_warmup:  # e.g. a torch.compile'd prototype: keep compilation out of the measured step
        run()
    measure_call(run, out)
    out["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # after the reset
    out["peak_above_imports_gib"] = out["hwm_step_gib"] - rss_imports
    print("RESULT " + json.dumps(out), flush=True)


def measure_call(run, out: dict):
    """The loaded RSS and loading peak, then the high-water mark reset and one run(): its seconds,
    its peak, the process peak (= ru_maxrss) and the peak above the loaded process, into `out`."""
    out["rss_loaded_gib"] = rss_gib()
    out["hwm_load_gib"] = _status_kib("VmHWM:") / 2**20
    reset_hwm()
    t = time.perf_counter()
    run()
    out["seconds"] = time.perf_counter() - t
    out["hwm_step_gib"] = _status_kib("VmHWM:") / 2**20
    out["peak_raw_gib"] = max(out["hwm_load_gib"], out["hwm_step_gib"])
    out["step_above_loaded_gib"] = out["hwm_step_gib"] - out["rss_loaded_gib"]


def run_memory(a, cfg, results, log):
    log("\n## Peak memory (CPU RSS; each variant in a fresh subprocess, one step after loading)")
    variants = ["selfkd-off", "selfkd-on"] + ([] if a.no_gc_row else ["selfkd-off-gc"]) + \
               ["peer-off", "peer-on", "peer-2T-off"]
    if "loss" in a.only:
        variants += ["loss-selfkd", "loss-trl"]
    # every worker builds on the same cached checkpoint and adapter
    ours = load_ours(a, ensure_checkpoint(a, cfg, log), cfg)
    adapter_dir(a, cfg, ours)
    del ours
    rows = {}
    for v in variants:
        row = run_worker(__file__, v, log)
        if row is not None:
            rows[v] = row
    log(f"{'variant':<14} {'raw peak GiB':>12} {'step peak GiB':>13} {'step - loaded':>13} {'peak - imports':>14} "
        f"{'imports':>8} {'loaded':>7} {'step s':>7}")
    for v, r in rows.items():
        log(f"{v:<14} {r['peak_raw_gib']:12.3f} {r['hwm_step_gib']:13.3f} {r['step_above_loaded_gib']:13.3f} "
            f"{r['peak_above_imports_gib']:14.3f} {r['rss_imports_gib']:8.3f} {r['rss_loaded_gib']:7.3f} "
            f"{r['seconds']:7.2f}")
    results["memory"] = rows
    for ours_v, peer_v in (("selfkd-off", "peer-off"), ("selfkd-on", "peer-on"), ("selfkd-off", "peer-2T-off"),
                           ("loss-selfkd", "loss-trl")):
        if ours_v in rows and peer_v in rows:
            o, p = rows[ours_v], rows[peer_v]
            log(f"  {ours_v} / {peer_v}: raw peak {o['peak_raw_gib'] / p['peak_raw_gib']:.3f}x, "
                f"step above loaded {o['step_above_loaded_gib'] / p['step_above_loaded_gib']:.3f}x, "
                f"peak above imports {o['peak_above_imports_gib'] / p['peak_above_imports_gib']:.3f}x")


def strip_flags(argv):
    """Drop --only/--reps/--profile (the worker runs one variant once)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--only", "--reps", "--json"):
            skip = True
            continue
        if x.startswith(("--only=", "--reps=", "--json=")) or x == "--profile":
            continue
        out.append(x)
    return out


def run_memory_cuda(a, cfg, ours, peer, data, results, log):
    """On CUDA max_memory_allocated is exact per region: measure in-process."""
    log("\n## Peak memory (torch.cuda.max_memory_allocated during one step)")
    rows = {}
    oopt = torch.optim.AdamW(lora_params(ours), lr=1e-5)
    popt = torch.optim.AdamW(lora_params(peer), lr=1e-5)
    gen = torch.Generator(device=a.device).manual_seed(0)
    runs = [("selfkd-off", lambda: selfkd_step(a, cfg, ours, oopt, data, False)),
            ("selfkd-on", lambda: selfkd_step(a, cfg, ours, oopt, data, True, gen)),
            ("peer-off", lambda: peer_step(a, peer, shared_teacher(peer), popt, data, False)),
            ("peer-on", lambda: peer_step(a, peer, shared_teacher(peer), popt, data, True))]
    for name, fn in runs:
        try:
            with GpuPeak(a) as m:
                fn()
            rows[name] = {"peak_raw_gib": m.peak, "step_above_loaded_gib": m.delta}
        except torch.OutOfMemoryError:
            rows[name] = {"oom": True}
            opt_zero(oopt, popt)
    try:
        second = load_hf_thinker(a, ckpt_path(a, cfg))
        with GpuPeak(a) as m:
            peer_step(a, peer, separate_teacher(second), popt, data, False)
        rows["peer-2T-off"] = {"peak_raw_gib": m.peak, "step_above_loaded_gib": m.delta}
        del second
    except torch.OutOfMemoryError:
        rows["peer-2T-off"] = {"oom": True}
    torch.cuda.empty_cache()
    for v, r in rows.items():
        log(f"{v:<14} " + ("OOM" if r.get("oom") else f"peak {r['peak_raw_gib']:.2f} GiB, step above loaded "
                                                        f"{r['step_above_loaded_gib']:.2f} GiB"))
    results["memory"] = rows


def opt_zero(*opts):
    for o in opts:
        o.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# FLOPs: matmul FLOPs of one step, counted from the shapes (2*m*n*k per matmul)


def count_flops(cfg, B, P, C, lora_r=8):
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, K, I = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    r = lora_r
    base = 2 * H * nh * hd * 2 + 2 * H * nkv * hd * 2 + 2 * H * E + K * (2 * H * 2 * I + 2 * I * H)  # per token, layer
    lora = 2 * r * (H + nh * hd) * 2 + 2 * r * (H + nkv * hd) * 2 + K * (2 * r * (H + 2 * I) + 2 * r * (I + H))

    def attn(keys):  # QK^T and AV for one query over `keys` keys (SDPA with a mask computes all of them)
        return 2 * 2 * keys * hd * nh

    T = P + C
    tokens = B * T
    head_row = 2 * H * V
    fwd_base = tokens * L * (base + attn(T))
    fwd_lora = tokens * L * lora
    teacher = fwd_base
    student = fwd_base + fwd_lora
    # backward: base weights frozen -> activation grads only (1x); attention core 2x (dQ,dK and dP,dV);
    # LoRA 2x (activation + weight grads). Upper bound: layer 0 needs no input grad.
    backward = tokens * L * (base + 2 * attn(T) + 2 * lora)
    body = teacher + student + backward
    ours_head = 3 * B * C * head_row  # teacher + student logits on completion rows + dL/dhidden
    peer_head = 3 * B * T * head_row  # full-sequence logits for both + backward over all rows
    # generation: prefill + C - 1 decode steps; selfkd's generate projects only the last position onto
    # the vocabulary (since f23e4c5), transformers' thinker projects every prompt position
    prefill = B * P * L * (base + lora + attn(P))
    decode = sum(B * L * (base + lora + attn(P + t + 1)) for t in range(1, C))
    gen_head_exec = (B * P + B * (C - 1)) * head_row
    gen_head_min = B * C * head_row  # logits only where a token is sampled
    return {
        "off": {"model": body + ours_head, "selfkd": body + ours_head, "peer": body + peer_head,
                "lm_head_selfkd": ours_head, "lm_head_peer": peer_head, "body": body, "student_fwd": student},
        "on": {"model": body + ours_head + prefill + decode + gen_head_min,
               "selfkd": body + ours_head + prefill + decode + gen_head_min,
               "peer": body + peer_head + prefill + decode + gen_head_exec},
    }


def matmul_peak(a):
    n = a.mm_size or (8192 if a.device.startswith("cuda") else 2048)
    x = torch.randn(n, n, device=a.device, dtype=torch_dtype(a))
    y = torch.randn(n, n, device=a.device, dtype=torch_dtype(a))
    times = []
    for _ in range(4):
        sync(a)
        t = time.perf_counter()
        torch.mm(x, y)
        sync(a)
        times.append(time.perf_counter() - t)
    return n, 2 * n**3 / min(times[1:]) / 1e9


# ----------------------------------------------------------------------------------------------
# Sections


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def run_step(a, cfg, ours, engine, peer, data, results, log):
    tok = a.batch * a.completion
    log(f"\n## GKD step (batch {a.batch}, prompt {a.prompt}, completion {a.completion}: {tok} completion tokens; "
        f"beta {a.beta}, T {a.temperature}; gradient checkpointing off unless -gc)")
    oopt = torch.optim.AdamW(lora_params(ours), lr=1e-5)
    popt = torch.optim.AdamW(lora_params(peer), lr=1e-5)
    teacher = shared_teacher(peer)
    # check (also the warm-up): same loss and LoRA gradient norm, no optimizer step
    t = time.perf_counter()
    lo = selfkd_step(a, cfg, ours, oopt, data, False, do_step=False)
    go = grad_norm(lora_params(ours))
    t1 = time.perf_counter()
    lp = peer_step(a, peer, teacher, popt, data, False, do_step=False)
    gp = grad_norm(lora_params(peer))
    t2 = time.perf_counter()
    oopt.zero_grad(set_to_none=True)
    popt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    le = selfkd_train_step(a, cfg, engine, data, False)  # warm-up of the engine (the same weights: the same loss)
    t4 = time.perf_counter()
    log(f"check (off-policy, before any update): loss selfkd {lo:.7f} peer {lp:.7f} "
        f"(rel diff {abs(lo - lp) / abs(lp):.2e}); LoRA grad norm selfkd {go:.6e} peer {gp:.6e} "
        f"(rel diff {abs(go - gp) / gp:.2e}); train_step loss {le:.7f}; warm-up s: bare {t1 - t:.2f}, "
        f"peer {t2 - t1:.2f}, train_step {t4 - t3:.2f}")
    results["check"] = {"loss_selfkd": lo, "loss_peer": lp, "grad_norm_selfkd": go, "grad_norm_peer": gp,
                        "loss_train_step": le}

    gen = torch.Generator(device=a.device).manual_seed(0)
    variants = {
        "selfkd-off": lambda tm: selfkd_train_step(a, cfg, engine, data, False),
        "bare-off": lambda tm: selfkd_step(a, cfg, ours, oopt, data, False),
        "peer-off": lambda tm: peer_step(a, peer, teacher, popt, data, False),
        "selfkd-on": lambda tm: selfkd_train_step(a, cfg, engine, data, True, gen, tm),
        "bare-on": lambda tm: selfkd_step(a, cfg, ours, oopt, data, True, gen, tm),
        "peer-on": lambda tm: peer_step(a, peer, teacher, popt, data, True, tm),
    }
    if a.compile_decode:  # the on-policy step with --compile_decode true (compiled once, before the timing)
        from generate import CompiledStep

        step = CompiledStep(engine.module, log)
        variants["selfkd-on-compiled"] = lambda tm: selfkd_train_step(a, cfg, engine, data, True, gen, tm, step=step)
        variants["selfkd-on-compiled"](None)
    if not a.no_gc_row:
        def gc_step(tm):
            engine.module.gradient_checkpointing = True
            try:
                return selfkd_train_step(a, cfg, engine, data, False)
            finally:
                engine.module.gradient_checkpointing = False
        variants["selfkd-off-gc"] = gc_step
    names = list(variants)
    times = {n: [] for n in names}
    gen_times = {n: [] for n in names}
    for rep in range(a.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            tm = {}
            sync(a)
            t = time.perf_counter()
            variants[n](tm)
            sync(a)
            times[n].append(time.perf_counter() - t)
            if "gen" in tm:
                gen_times[n].append(tm["gen"])
        log(f"  rep {rep + 1}/{a.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    rows = {}
    log(f"{'variant':<14} {'median s':>9} {'tokens/s':>9} {'gen s':>7} {'all s'}")
    for n in names:
        m = med(times[n])
        rows[n] = {"median_s": m, "min_s": min(times[n]), "tokens_per_s": tok / m, "times": times[n],
                   "gen_median_s": med(gen_times[n])}
        log(f"{n:<14} {m:9.3f} {tok / m:9.1f} {med(gen_times[n]):7.2f} {[round(x, 2) for x in times[n]]}")
    for branch in ("off", "on"):
        o, p, b = rows[f"selfkd-{branch}"], rows[f"peer-{branch}"], rows[f"bare-{branch}"]
        log(f"  {branch}-policy: peer / selfkd time = {p['median_s'] / o['median_s']:.2f}x; selfkd (train_step) / "
            f"bare = {o['median_s'] / b['median_s']:.2f}x (fastest reps: {o['min_s'] / b['min_s']:.2f}x)")
    if "selfkd-on-compiled" in rows:
        c = rows["selfkd-on-compiled"]
        log(f"  on-policy, decode step compiled: peer / selfkd time = {rows['peer-on']['median_s'] / c['median_s']:.2f}x"
            f"; sampling {c['gen_median_s']:.2f} s vs {rows['selfkd-on']['gen_median_s']:.2f} s eager")
    results["step"] = rows

    # FLOPs and the matmul peak, same process
    fl = count_flops(cfg, a.batch, a.prompt, a.completion)
    n, peak = matmul_peak(a)
    log(f"\n## FLOPs (matmul, analytic) vs a {n}x{n}x{n} torch.mm at {peak:.1f} GFLOP/s ({a.dtype}, {a.device})")
    log(f"off-policy: body (teacher fwd + student fwd + bwd) {fl['off']['body'] / 1e9:.2f} GFLOP; lm_head selfkd "
        f"{fl['off']['lm_head_selfkd'] / 1e9:.2f} GFLOP (completion rows), peer {fl['off']['lm_head_peer'] / 1e9:.2f}"
        f" GFLOP (all rows)")
    log(f"{'variant':<14} {'model GFLOP':>11} {'executed GFLOP':>14} {'model GFLOP/s':>13} {'MFU':>6} "
        f"{'executed GFLOP/s':>16} {'exec. frac':>10}")
    frows = {}
    for name in names:
        side = "selfkd" if name.startswith(("selfkd", "bare")) else "peer"
        branch = "on" if "-on" in name else "off"
        model_f, exec_f = fl[branch]["model"], fl[branch][side]
        if name.endswith("-gc"):
            exec_f += fl["off"]["student_fwd"]  # checkpointing recomputes the student forward of the body
        s = rows[name]["median_s"]
        frows[name] = {"model_gflop": model_f / 1e9, "executed_gflop": exec_f / 1e9,
                       "model_gflops": model_f / s / 1e9, "mfu": model_f / s / 1e9 / peak,
                       "executed_gflops": exec_f / s / 1e9, "executed_frac": exec_f / s / 1e9 / peak}
        r = frows[name]
        log(f"{name:<14} {r['model_gflop']:11.2f} {r['executed_gflop']:14.2f} {r['model_gflops']:13.2f} "
            f"{r['mfu']:6.3f} {r['executed_gflops']:16.2f} {r['executed_frac']:10.3f}")
    results["flops"] = {"matmul_n": n, "matmul_gflops": peak, "rows": frows}


def run_profile(a, cfg, engine, peer, data, log):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    popt = torch.optim.AdamW(lora_params(peer), lr=1e-5)
    gen = torch.Generator(device=a.device).manual_seed(0)
    sort = "self_device_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    for name, fn in (("selfkd-off", lambda: selfkd_train_step(a, cfg, engine, data, False)),
                     ("selfkd-on", lambda: selfkd_train_step(a, cfg, engine, data, True, gen)),
                     ("peer-off", lambda: peer_step(a, peer, shared_teacher(peer), popt, data, False))):
        with profile(activities=acts) as prof:
            fn()
        log(f"\n--- torch.profiler, {name}: top ops by {sort} ---")
        log(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48))


def loss_inputs(a, cfg):
    torch.manual_seed(0)
    dt = torch_dtype(a)
    H, V = cfg.hidden_size, cfg.vocab_size
    hs = torch.randn(a.loss_rows, H, device=a.device, dtype=dt)
    ht = (hs.float() + 0.3 * torch.randn(hs.shape, device=a.device)).to(dt)
    weight = (torch.randn(V, H, device=a.device) / H**0.5).to(dt)
    mask = torch.ones(a.loss_rows, dtype=torch.bool, device=a.device)
    return (hs, ht, weight, mask, a.beta, a.temperature)


def loss_selfkd(inputs, chunk):
    from bench_loss import selfkd_chunked

    return selfkd_chunked(*inputs, chunk)


def loss_trl(inputs):
    from bench_loss import trl_fp32

    return trl_fp32(*inputs)


def run_loss(a, cfg, results, log):
    log(f"\n## Loss alone: [{a.loss_rows} x {cfg.vocab_size}] logits from hidden {cfg.hidden_size} ({a.dtype}), "
        f"fwd + bwd (bench/bench_loss.py: selfkd_chunked chunk {a.loss_chunk} vs trl_fp32 = TRL's formula on fp32 logits)")
    inputs = loss_inputs(a, cfg)
    fns = {"selfkd chunked": lambda: loss_selfkd(inputs, a.loss_chunk), "TRL fp32": lambda: loss_trl(inputs)}
    (lo, go), (lt, gt) = fns["selfkd chunked"](), fns["TRL fp32"]()  # warm-up + check
    diff = float((go.float() - gt.float()).norm() / gt.float().norm())
    log(f"check: loss selfkd {lo:.7f} TRL {lt:.7f} (rel diff {abs(lo - lt) / abs(lt):.2e}); "
        f"grad rel diff {diff:.2e}")
    del go, gt
    times = {n: [] for n in fns}
    gpu_peak = {n: 0.0 for n in fns}
    names = list(fns)
    for rep in range(a.reps):
        for n in names[rep % 2:] + names[:rep % 2]:
            if a.device.startswith("cuda"):
                with GpuPeak(a) as m:
                    t = time.perf_counter()
                    fns[n]()
                    sync(a)
                    times[n].append(time.perf_counter() - t)
                gpu_peak[n] = max(gpu_peak[n], m.delta)
            else:
                t = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t)
    rows = {n: {"median_s": med(times[n]), "times": times[n]} for n in names}
    if a.device.startswith("cuda"):
        for n in names:
            rows[n]["peak_above_inputs_gib"] = gpu_peak[n]
    for n in names:
        extra = f"  peak above inputs {rows[n]['peak_above_inputs_gib']:.2f} GiB" if "peak_above_inputs_gib" in rows[n] \
            else ""
        log(f"{n:<16} median {rows[n]['median_s']:.3f} s {[round(x, 2) for x in times[n]]}{extra}")
    log(f"  TRL / selfkd time = {rows['TRL fp32']['median_s'] / rows['selfkd chunked']['median_s']:.2f}x "
        f"; CPU peak memory: see the memory section (loss-selfkd, loss-trl)")
    results["loss"] = {"rows": rows, "loss_selfkd": lo, "loss_trl": lt, "grad_rel_diff": diff}


def run_gen(a, cfg, ours, peer, data, results, log):
    from lora import lora_disabled

    tok = a.batch * a.completion
    log(f"\n## Generation: batch {a.batch}, prompt {a.prompt}, {a.completion} new tokens, T {a.temperature}, "
        "top_k 0, top_p 1, KV cache on both sides")
    gen = torch.Generator(device=a.device).manual_seed(0)
    cfg_hf = peer_generation_config(a)

    def ours_gen():
        return selfkd_generate(a, cfg, ours, data, gen)

    def hf_gen():
        with torch.no_grad():
            return peer.generate(input_ids=data.prompt_ids, attention_mask=data.prompt_mask,
                                 generation_config=cfg_hf)

    def ours_base():
        with lora_disabled(ours):
            return ours_gen()

    def hf_base():
        with peer.disable_adapter():
            return hf_gen()

    fns = {"selfkd LoRA": ours_gen, "HF+peft LoRA": hf_gen, "selfkd base": ours_base, "HF base": hf_base}
    out_o, out_h = ours_gen(), hf_gen()  # warm-up and length check
    assert out_o[0].shape == (a.batch, a.completion), out_o[0].shape
    assert out_h.shape == (a.batch, a.prompt + a.completion), out_h.shape
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(a.reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            sync(a)
            t = time.perf_counter()
            fns[n]()
            sync(a)
            times[n].append(time.perf_counter() - t)
    rows = {n: {"median_s": med(times[n]), "tokens_per_s": tok / med(times[n]), "times": times[n]} for n in names}
    for n in names:
        log(f"{n:<14} median {rows[n]['median_s']:.3f} s  {rows[n]['tokens_per_s']:8.1f} tokens/s "
            f"{[round(x, 2) for x in times[n]]}")
    for o, h in (("selfkd LoRA", "HF+peft LoRA"), ("selfkd base", "HF base")):
        log(f"  {o} vs {h}: {rows[o]['tokens_per_s'] / rows[h]['tokens_per_s']:.2f}x tokens/s")
    results["gen"] = rows


def run_moe(a, cfg, results, log):
    """One MoE block at the model's width: selfkd SparseMoE vs transformers' block with its default experts
    backend (grouped_mm, what PreTrainedModel picks) and eager; same parameter objects (bench_moe.build).
    Frozen weights (LoRA training: only the input needs a gradient); fwd and fwd+bwd, interleaved."""
    import bench_moe

    margs = SimpleNamespace(hidden=cfg.hidden_size, experts=cfg.num_experts, topk=cfg.num_experts_per_tok,
                            inter=cfg.moe_intermediate_size, seed=0, router_std=None, proposed=False)
    ours, hf, hf_cfg, _, _ = bench_moe.build(margs, torch_dtype(a))
    ours.to(a.device)  # hf holds the same Parameter objects: moved with it
    params = list(ours.parameters())
    for p in params:
        p.requires_grad_(False)
    x = torch.randn(1, a.moe_tokens, cfg.hidden_size, device=a.device, dtype=torch_dtype(a))
    cot = torch.randn_like(x)
    fns = {"selfkd": ours, "HF grouped_mm": bench_moe.hf_forward(hf, hf_cfg, "grouped_mm"),
           "HF eager": bench_moe.hf_forward(hf, hf_cfg, "eager")}
    log(f"\n## MoE block: x [1, {a.moe_tokens}, {cfg.hidden_size}], {cfg.num_experts} experts top-"
        f"{cfg.num_experts_per_tok}, intermediate {cfg.moe_intermediate_size}, {a.dtype}, frozen weights")
    ref = None
    for n, fn in fns.items():  # check + warm-up
        xi = x.detach().requires_grad_(True)
        out = fn(xi)
        out.backward(cot)
        if ref is None:
            ref = (out.detach().float(), xi.grad.float())
        else:
            log(f"  check {n}: max|out - selfkd| {(out.detach().float() - ref[0]).abs().max().item():.3g}, "
                f"max|dx - selfkd| {(xi.grad.float() - ref[1]).abs().max().item():.3g}")
    names = list(fns)
    fwd, both = {n: [] for n in names}, {n: [] for n in names}
    for rep in range(max(a.reps, 3)):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            xi = x.detach().requires_grad_(True)
            sync(a)
            t0 = time.perf_counter()
            out = fns[n](xi)
            sync(a)
            t1 = time.perf_counter()
            out.backward(cot)
            sync(a)
            t2 = time.perf_counter()
            fwd[n].append(t1 - t0)
            both[n].append(t2 - t0)
    rows = {n: {"fwd_s": med(fwd[n]), "fwd_bwd_s": med(both[n])} for n in names}
    for n in names:
        log(f"{n:<14} fwd {rows[n]['fwd_s'] * 1e3:8.2f} ms  fwd+bwd {rows[n]['fwd_bwd_s'] * 1e3:8.2f} ms  "
            f"(HF / selfkd fwd+bwd: {rows[n]['fwd_bwd_s'] / rows['selfkd']['fwd_bwd_s']:.2f}x)")
    results["moe"] = rows


def summary(a, cfg, results, log):
    log("\n## Summary (ratio: > 1 means selfkd is better)")
    log("| what | selfkd | peer | ratio |")
    log("|---|---:|---:|---:|")
    s = results.get("step")
    if s:
        for b in ("off", "on"):
            o, p = s[f"selfkd-{b}"], s[f"peer-{b}"]
            log(f"| GKD step {b}-policy, s (tokens/s) | {o['median_s']:.2f} ({o['tokens_per_s']:.0f}) | "
                f"{p['median_s']:.2f} ({p['tokens_per_s']:.0f}) | {p['median_s'] / o['median_s']:.2f}x |")
        for b in ("off", "on"):
            o, p = s[f"selfkd-{b}"], s[f"bare-{b}"]
            log(f"| GKD step {b}-policy: train_step on the engine vs the bare step, s | {o['median_s']:.2f} | "
                f"{p['median_s']:.2f} (bare) | {o['median_s'] / p['median_s']:.2f}x (selfkd / bare) |")
        if "selfkd-off-gc" in s:
            g = s["selfkd-off-gc"]
            log(f"| GKD step off-policy, selfkd grad. ckpt on, s | {g['median_s']:.2f} | | |")
    m = results.get("memory")
    if m:
        key = "peak_raw_gib"
        for o, p in (("selfkd-off", "peer-off"), ("selfkd-on", "peer-on"), ("selfkd-off", "peer-2T-off"),
                     ("loss-selfkd", "loss-trl")):
            if o in m and p in m and key in m[o] and key in m[p]:
                log(f"| peak memory {o} vs {p}, GiB raw (step above loaded) | {m[o][key]:.2f} "
                    f"({m[o]['step_above_loaded_gib']:.2f}) | {m[p][key]:.2f} ({m[p]['step_above_loaded_gib']:.2f}) "
                    f"| {m[o][key] / m[p][key]:.3f}x ({m[o]['step_above_loaded_gib'] / m[p]['step_above_loaded_gib']:.3f}x) |")
    lo = results.get("loss")
    if lo:
        o, p = lo["rows"]["selfkd chunked"], lo["rows"]["TRL fp32"]
        log(f"| loss alone fwd+bwd, s | {o['median_s']:.3f} | {p['median_s']:.3f} | {p['median_s'] / o['median_s']:.2f}x |")
    g = results.get("gen")
    if g:
        for o, p in (("selfkd LoRA", "HF+peft LoRA"), ("selfkd base", "HF base")):
            log(f"| generate tokens/s ({o.split()[1]}) | {g[o]['tokens_per_s']:.1f} | {g[p]['tokens_per_s']:.1f} | "
                f"{g[o]['tokens_per_s'] / g[p]['tokens_per_s']:.2f}x |")
    mo = results.get("moe")
    if mo:
        for n in ("HF grouped_mm", "HF eager"):
            log(f"| MoE block fwd+bwd (frozen), ms: selfkd vs {n} | {mo['selfkd']['fwd_bwd_s'] * 1e3:.2f} | "
                f"{mo[n]['fwd_bwd_s'] * 1e3:.2f} | {mo[n]['fwd_bwd_s'] / mo['selfkd']['fwd_bwd_s']:.2f}x |")
    f = results.get("flops")
    if f:
        for n, r in f["rows"].items():
            log(f"| {n}: model GFLOP/s (fraction of {f['matmul_n']}^3 mm {f['matmul_gflops']:.0f} GFLOP/s) | "
                f"{r['model_gflops']:.2f} ({r['mfu']:.3f}) | | |")


def main(argv=None):
    a = parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import selfkd  # noqa: F401  (first, so that bench_loss's sys.path edit cannot pick another copy under --src)

    if a.worker:
        return memory_worker(a, a.worker)
    t_start = time.perf_counter()
    cfg = model_config(a)
    results = {"argv": sys.argv, "config": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg)}

    def log(msg):
        print(msg, flush=True)

    import platform

    import peft
    import transformers
    import trl

    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    log(f"# bench_gkd  {time.strftime('%Y-%m-%d %H:%M')}  {dev}")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")
    log(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads x {cfg.head_dim}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, "
        f"intermediate {cfg.moe_intermediate_size}, vocab {cfg.vocab_size}, {a.dtype} on {a.device}; "
        f"LoRA r8 alpha16 dropout 0 on q,k,v,o + experts")
    path = ensure_checkpoint(a, cfg, log)
    needs_models = any(s in a.only for s in ("step", "gen")) or ("memory" in a.only and a.device != "cpu")
    ours = peer = data = engine = None
    if needs_models:
        t = time.perf_counter()
        ours = load_ours(a, path, cfg)
        peer = load_peer(a, path, adapter_dir(a, cfg, ours))
        data = make_data(a, cfg)
        hf_cfg = peer.get_base_model().config
        log(f"loaded both models ({time.perf_counter() - t:.1f} s); HF experts backend "
            f"{getattr(hf_cfg.text_config, '_experts_implementation', None) or getattr(hf_cfg, '_experts_implementation', None)!r}, "
            f"attention {getattr(hf_cfg.text_config, '_attn_implementation', None)!r}; trainable LoRA params: selfkd "
            f"{sum(p.numel() for p in lora_params(ours)):,}, peft {sum(p.numel() for p in lora_params(peer)):,}")
    if "step" in a.only or a.profile:
        t = time.perf_counter()
        engine = selfkd_engine(load_ours(a, path, cfg), a.dtype, a.batch)
        log(f"DeepSpeed engine for train_step: ZeRO stage {engine.zero_optimization_stage()} "
            f"({time.perf_counter() - t:.1f} s)")
    if "step" in a.only:
        run_step(a, cfg, ours, engine, peer, data, results, log)
    if "gen" in a.only:
        run_gen(a, cfg, ours, peer, data, results, log)
    if a.profile:
        run_profile(a, cfg, engine, peer, data, log)
    if "memory" in a.only and a.device != "cpu":
        run_memory_cuda(a, cfg, ours, peer, data, results, log)
    del ours, peer, data, engine
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if "loss" in a.only:
        run_loss(a, cfg, results, log)
    if "moe" in a.only:
        run_moe(a, cfg, results, log)
    if "memory" in a.only and a.device == "cpu":
        run_memory(a, cfg, results, log)
    summary(a, cfg, results, log)
    log(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: {os.path.relpath(sys.executable)} "
        + " ".join([os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
