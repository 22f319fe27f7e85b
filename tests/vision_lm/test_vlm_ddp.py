"""The preference objective and generation through a DDP-wrapped model (one gloo process, in this process)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.adapter import VLExample, VLMAdapter
from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective, PrefPair

PROMPT = "<image> describe :"


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["dpo", "rrpo"])
def test_preference_objective_under_ddp_equals_the_unwrapped_model(process_group, images, method):
    """The trainer hands the loss the DDP wrapper: the adapter reads config / helpers from the module inside (it
    raised AttributeError on ``config``) and encodes the images inside the wrapped forward (no shared-feature
    shortcut outside it), so loss and gradients equal the unwrapped model's."""
    from peft import LoraConfig, get_peft_model

    from mmalign.vision_lm.tiny import build_tiny_llava

    scenes, imgs = images
    model, proc = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))  # policy != reference: a non-trivial loss
    ad = VLMAdapter(model, proc)
    pairs = [PrefPair(PROMPT, S.caption(s), "a big red circle .", [im]) for s, im in zip(scenes[:3], imgs[:3])]
    batch = PairCollator(ad, with_segments=method == "rrpo")(list(enumerate(pairs)))
    objective = PreferenceObjective(ad, method)
    loss, _ = objective(model, batch)
    loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    assert ad._shared_image_features([batch["chosen"], batch["rejected"]]) is not None  # unwrapped: shared

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    got, _ = objective(ddp, batch)
    assert ad._shared_image_features([batch["chosen"], batch["rejected"]]) is None  # wrapped: per branch
    got.backward()
    grads = _grads(model)
    assert abs(loss.item() - math.log(2)) > 1e-4 and got.item() == pytest.approx(loss.item(), abs=1e-5)
    assert want.keys() == grads.keys() and want
    for n in want:
        assert torch.allclose(grads[n], want[n], atol=1e-5), n


def test_generate_and_scoring_through_a_ddp_wrapper(process_group, llava, images):
    scenes, imgs = images
    exs = [VLExample(PROMPT, "", [imgs[0]]), VLExample(PROMPT, "a big", [imgs[1]])]
    want_text, want_logits = llava.generate(exs, max_new_tokens=5), llava.next_token_logits(exs)
    ad = VLMAdapter(torch.nn.parallel.DistributedDataParallel(llava.model), llava.processor)
    assert ad.generate(exs, max_new_tokens=5) == want_text
    assert torch.allclose(ad.next_token_logits(exs), want_logits, atol=1e-6)
