"""Test worker, one per rank under `torch.distributed.run --nproc_per_node 2`: the thinker with its towers
built by selfkd.build_student under ZeRO-3 (every parameter, the towers' included, streamed from the
released layout straight into this rank's partition), then the rounds of tests/test_omni_model.py's
`test_towers_under_zero3_with_two_processes`:

    python tests/zero3_omni.py MODEL_DIR ROUNDS_FILE OUT_DIR

ROUNDS_FILE (torch.save) holds, per round and per rank, (input_ids, attention_mask, MediaInputs | None).
Rounds marked "train" run forward + backward + an optimizer step with LoRA on the towers; the others
save their fp32 logits (every VOCAB_STRIDE-th) to OUT_DIR/rank{r}.pt. The ranks' batches differ in
their media on purpose (one rank text-only while the other has images, audio and video): the towers'
gathers must still match.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import lora_parameters  # noqa: E402
from selfkd import Config, build_student, check_weights, deepspeed_config, init_distributed  # noqa: E402


VOCAB_STRIDE = 37  # what is saved of the 152064 logits per token


def main(model_dir: str, rounds_file: str, out_dir: str):
    import deepspeed

    cfg = Config(model=model_dir, torch_dtype="float32", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                 freeze_vit=False, freeze_aligner=False, learning_rate=1e-2)
    device = init_distributed(cfg)
    rank = torch.distributed.get_rank()
    ds = deepspeed_config(cfg, torch.float32)
    model, summary, sums = build_student(cfg, ds, torch.float32, device, log=lambda msg: None, towers=True)
    assert summary.targets[-2:] == ("vit", "aligner"), summary
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=cfg.learning_rate)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    check_weights(engine, sums, torch.float32)
    audio_B = [p for n, p in lora_parameters(model) if n.startswith("audio_tower.") and n.endswith(".B")]
    results = []
    for kind, per_rank in torch.load(rounds_file, weights_only=False):
        ids, mask, media = per_rank[rank]
        if kind == "train":
            engine.train()
            engine.backward(engine(ids, mask, media_inputs=media).square().mean())
            engine.step()
            with deepspeed.zero.GatheredParameters(audio_B):
                results.append(max(float(b.abs().max()) for b in audio_B))  # B starts at 0: moved?
        else:
            engine.eval()
            with torch.no_grad():  # a strided sample of the vocabulary (each logit reads the whole hidden state)
                results.append(engine(ids, mask, media_inputs=media)[..., ::VOCAB_STRIDE])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
