"""One whole GKD step against the reference stack: transformers' thinker + a PEFT adapter with our
LoRA weights, the teacher being the same PEFT model under `disable_adapter()`, and TRL's
`generalized_jsd_loss` on the completion tokens. Same weights, same batch: equal loss and equal
LoRA gradients, fp32.

Tolerances: the two stacks compute the same fp32 arithmetic in a different order (attention
kernels, the expert sum, our closed-form loss gradient vs autograd through log_softmax), so they
agree to fp32 rounding accumulated over 2 layers: 1e-5 relative on the loss and 1e-4 relative on
each gradient tensor (its norm). The gradients are ~1e-3 in size, far above both.
"""
import os

import pytest
import torch

from chat import Batch
from hf_models import hf_full_model, left_padded_batch, tiny_config
from lora import _peft_entries, inject_lora, lora_parameters, save_adapter
from weights import load_thinker
from selfkd import gkd_loss_sums

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

CFG = tiny_config(num_hidden_layers=2, moe_intermediate_size=24)
BETA, TEMPERATURE = 0.5, 2.0


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """(our student, the PEFT model) with identical, non-zero LoRA weights."""
    from peft import PeftModel
    from transformers import Qwen3OmniMoeForConditionalGeneration

    path = str(tmp_path_factory.mktemp("hf"))
    hf_full_model(CFG, seed=5).save_pretrained(path)
    ours = load_thinker(path, dtype=torch.float32)
    inject_lora(ours, rank=4, alpha=8, dropout=0.0, targets="ALL", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(ours):
            if name.endswith("B"):  # B = 0 would make student == teacher: zero loss, zero gradient
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    adapter = str(tmp_path_factory.mktemp("adapter"))
    save_adapter(ours, adapter)
    thinker = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).thinker
    peft_model = PeftModel.from_pretrained(thinker, adapter, is_trainable=True)
    return ours.train(), peft_model.train()


def test_one_gkd_step_equals_transformers_peft_and_trl(stacks):
    from trl.experimental.gkd import GKDTrainer

    from chat import join_prompt_completion, labels_for

    ours, peft_model = stacks
    prompt_ids, prompt_mask = left_padded_batch(CFG.vocab_size, [9, 6, 4], seed=1)
    g = torch.Generator().manual_seed(2)
    completion_ids = torch.randint(0, CFG.vocab_size - 2, (3, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)

    # ours: the trainer's own function (teacher pass under lora_disabled, student pass, chunked loss)
    batch = Batch(student_prompt_ids=prompt_ids, student_prompt_mask=prompt_mask, teacher_prompt_ids=prompt_ids,
                  teacher_prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask)
    jsd_sum, _, n = gkd_loss_sums(ours, batch, completion_ids, completion_mask, BETA, TEMPERATURE, with_sft=False)
    loss = jsd_sum / n
    loss.backward()

    # the reference: TRL's GKDTrainer.compute_loss with the teacher = the PEFT model, adapter disabled
    ids, mask, start = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
    labels = labels_for(ids, mask, start)
    student_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), peft_model.disable_adapter():
        teacher_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    ref = GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:],
                                          beta=BETA, temperature=TEMPERATURE)
    ref.backward()

    assert n == int(completion_mask.sum())
    assert ref.item() > 1e-4  # the adapter makes student and teacher differ
    assert rel(loss.detach(), ref.detach()) <= 1e-5
    peft_grads = {name.replace(".default", ""): p.grad for name, p in peft_model.named_parameters()
                  if p.requires_grad}
    entries = _peft_entries(ours)
    assert len(entries) == len(peft_grads) > 0
    for key, p, to_peft, _ in entries:
        assert rel(to_peft(p.grad), peft_grads[key]) <= 1e-4, key
