"""The diffusion adapter: shared (ε, t) per pair, references, targets, SDXL conditioning, LoRA, training steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmalign.diffusion.adapter import (
    LORA_TARGETS, PairBatch, add_lora, check_pair_batch, denoising_errors, make_loss_fn, pair_denoising_errors,
    paired_noise_and_timesteps, reference_pair_errors, training_target,
)
from diffusion_fixtures import ddpm, pair_batch, tiny_sd_unet


class Recorder(torch.nn.Module):
    """Wraps a UNet and records what one forward received."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, sample, timestep, **kw):
        self.calls.append({"sample": sample.detach().clone(), "t": timestep.detach().clone(),
                           "hidden": kw["encoder_hidden_states"].detach().clone()})
        return self.inner(sample, timestep, **kw)


def test_chosen_and_rejected_share_noise_and_timestep_in_one_forward(sd_unet):
    sched, batch = ddpm(), pair_batch(b=3)
    rec = Recorder(sd_unet)
    noise, t = paired_noise_and_timesteps(batch.chosen, 1000, torch.Generator().manual_seed(1))
    err_w, err_l = pair_denoising_errors(rec, sched, batch, noise, t)
    assert len(rec.calls) == 1 and err_w.shape == err_l.shape == (3,)
    call = rec.calls[0]
    assert call["sample"].shape[0] == 6
    torch.testing.assert_close(call["t"][:3], call["t"][3:])
    torch.testing.assert_close(call["hidden"][:3], call["hidden"][3:])
    # x_t = sqrt(a) x0 + sqrt(1-a) ε: removing each image's own signal leaves the same noise for both halves
    a = sched.alphas_cumprod[call["t"][:3]].view(-1, 1, 1, 1)
    eps_w = (call["sample"][:3] - a.sqrt() * batch.chosen) / (1 - a).sqrt()
    eps_l = (call["sample"][3:] - a.sqrt() * batch.rejected) / (1 - a).sqrt()
    torch.testing.assert_close(eps_w, eps_l, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_w, noise, atol=1e-4, rtol=1e-4)


def test_identical_images_give_identical_errors(sd_unet):
    batch = pair_batch(b=2)
    same = PairBatch(batch.chosen, batch.chosen.clone(), batch.encoder_hidden_states)
    noise, t = paired_noise_and_timesteps(same.chosen, 1000, torch.Generator().manual_seed(0))
    err_w, err_l = pair_denoising_errors(sd_unet, ddpm(), same, noise, t)
    torch.testing.assert_close(err_w, err_l)


def test_lora_disabled_reference_equals_base_model(sd_unet):
    base = copy.deepcopy(sd_unet).eval()
    lora = add_lora(sd_unet, r=4)
    with torch.no_grad():  # make the adapters change the function, as after training
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch, sched = pair_batch(b=2), ddpm()
    noise, t = paired_noise_and_timesteps(batch.chosen, 1000, torch.Generator().manual_seed(3))
    ref_w, ref_l = reference_pair_errors(lora, None, sched, batch, noise, t)
    base_w, base_l = pair_denoising_errors(base, sched, batch, noise, t)
    torch.testing.assert_close(ref_w, base_w)
    torch.testing.assert_close(ref_l, base_l)
    with torch.no_grad():
        pol_w, _ = pair_denoising_errors(lora, sched, batch, noise, t)
    assert not torch.allclose(pol_w, base_w)  # adapters are back on after the reference pass


def test_add_lora_keeps_its_seeded_init_and_leaves_the_global_rng_alone(sd_unet):
    """The LoRA init is the one drawn after ``torch.manual_seed(seed)``; the caller's global RNG is untouched."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    torch.rand(3)  # some state of the caller's own
    state = torch.get_rng_state()
    lora = add_lora(copy.deepcopy(sd_unet), r=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)  # the former implementation: reseed the global RNG, then let peft draw
    expected = get_peft_model(copy.deepcopy(sd_unet), LoraConfig(
        r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    got, want = lora.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and any("lora_A" in k for k in got)
    assert all(torch.equal(got[k], want[k]) for k in got)
    other = add_lora(copy.deepcopy(sd_unet), r=2, seed=6).state_dict()
    assert any(not torch.equal(got[k], other[k]) for k in got if "lora_A" in k)


def test_frozen_copy_reference_and_full_model_without_lora_is_an_error(sd_unet):
    batch, sched = pair_batch(b=2), ddpm()
    noise, t = paired_noise_and_timesteps(batch.chosen, 1000, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        reference_pair_errors(sd_unet, None, sched, batch, noise, t)
    frozen = copy.deepcopy(sd_unet)
    ref = reference_pair_errors(sd_unet, frozen, sched, batch, noise, t)
    torch.testing.assert_close(ref[0], pair_denoising_errors(sd_unet, sched, batch, noise, t)[0].detach())


def test_dpo_at_initialisation_is_log2(sd_unet):
    loss_fn = make_loss_fn("diffusion_dpo", ddpm(), generator=torch.Generator().manual_seed(0),
                           ref_model=copy.deepcopy(sd_unet), options={"beta": 5000.0})
    loss, metrics = loss_fn(sd_unet, pair_batch(b=2))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert "diffusion/ref_err_chosen" in metrics


@pytest.mark.parametrize("method", ["mapo", "diffusion_dpo", "sft"])
def test_training_steps_reduce_loss_on_a_fixed_batch(method):
    unet = tiny_sd_unet(seed=1)
    sched, batch = ddpm(), pair_batch(b=4, seed=5)
    ref = copy.deepcopy(unet).requires_grad_(False) if method == "diffusion_dpo" else None

    def loss_at_fixed_noise(model):
        fn = make_loss_fn(method, sched, generator=torch.Generator().manual_seed(7), ref_model=ref, options={"beta": 500.0})
        return fn(model, batch)[0]

    with torch.no_grad():
        before = loss_at_fixed_noise(unet).item()
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(8):
        loss = loss_at_fixed_noise(unet)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_at_fixed_noise(unet).item()
    assert after < before - 1e-3, (method, before, after)


def test_v_prediction_target_and_errors():
    sched = ddpm("v_prediction")
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(training_target(sched, x0, noise, t), v)
    torch.testing.assert_close(training_target(ddpm("epsilon"), x0, noise, t), noise)

    class Zero(torch.nn.Module):
        def forward(self, sample, timestep, **kw):
            return (torch.zeros_like(sample),)

    err = denoising_errors(Zero(), sched, x0, noise, t, torch.zeros(2, 1, 8))
    torch.testing.assert_close(err, v.pow(2).mean(dim=(1, 2, 3)))


def test_v_prediction_loss_through_a_real_unet(sd_unet):
    fn = make_loss_fn("mapo", ddpm("v_prediction"), generator=torch.Generator().manual_seed(0))
    loss, _ = fn(sd_unet, pair_batch(b=2))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in sd_unet.parameters())


def test_sdxl_added_conditioning_path(sdxl_unet):
    g = torch.Generator().manual_seed(0)
    b = 2
    batch = PairBatch(torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 4, 16, 16, generator=g),
                      torch.randn(b, 3, 64, generator=g), text_embeds=torch.randn(b, 32, generator=g),
                      time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]]).repeat(b, 1))
    lora = add_lora(sdxl_unet, r=2)
    fn = make_loss_fn("diffusion_dpo", ddpm(), generator=g, options={"beta": 5000.0})
    loss, metrics = fn(lora, batch)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at zero: policy = reference
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora" in n)
    with pytest.raises(ValueError, match="time_ids"):
        fn(lora, PairBatch(batch.chosen, batch.rejected, batch.encoder_hidden_states, text_embeds=batch.text_embeds))


def test_bad_batches_fail_before_any_forward():
    b = pair_batch(b=2)
    with pytest.raises(ValueError, match="rejected must have the shape of chosen"):
        check_pair_batch(PairBatch(b.chosen, b.rejected[:, :, :8, :8], b.encoder_hidden_states))
    bad = b.chosen.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="chosen holds non-finite"):
        check_pair_batch(PairBatch(bad, b.rejected, b.encoder_hidden_states))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        check_pair_batch(PairBatch(b.chosen, b.rejected, b.encoder_hidden_states[:1]))
    with pytest.raises(ValueError, match="'orpo' is neither 'sft' nor a registered loss"):
        make_loss_fn("orpo", ddpm())
    with pytest.raises(ValueError, match="not a diffusion loss"):
        make_loss_fn("dpo", ddpm())  # a registered loss of log-probabilities, not of denoising errors
    with pytest.raises(ValueError, match="missing"):
        PairBatch.from_mapping({"chosen": b.chosen})
