"""Full StableDiffusionPipeline sampling with a trained UNet, built offline from tiny configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmalign.diffusion.pipeline import (
    encode_prompts, evaluate_pipeline, generate, tiny_clip_tokenizer, tiny_sd_pipeline, with_unet,
)

WORDS = ["red", "green", "circle", "square"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(words=WORDS, image_size=16, text_dim=16)


def test_in_memory_clip_tokenizer():
    tok = tiny_clip_tokenizer(WORDS, model_max_length=8)
    ids = tok("a Red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]  # known words: one token
    assert len(tok("zebra").input_ids) == 2 + 5  # unknown words fall apart into bytes, never <unk>
    padded = tok(["red", "a green square"], padding="max_length", max_length=8).input_ids
    assert all(len(x) == 8 for x in padded) and max(max(x) for x in padded) < len(tok)
    with pytest.raises(ValueError, match="ASCII letters"):
        tiny_clip_tokenizer(["two words"])


def test_pipeline_call_equals_the_benchmark_sampling_loop_plus_vae_decode(pipe):
    """The benchmark's sampler (``sampling.sample``) is the pipeline's denoising loop: same images, same noise."""
    from mmalign.diffusion.sampling import sample

    cols = encode_prompts(pipe, ["a red circle", "a green square"])
    assert set(cols) == {"encoder_hidden_states"}  # SD: no pooled embeddings
    emb = cols["encoder_hidden_states"]
    assert emb.shape == (2, pipe.tokenizer.model_max_length, 16)
    images = generate(pipe, prompt_embeds=emb, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    latents = sample(pipe.unet, copy.deepcopy(pipe.scheduler), emb, (4, 8, 8), num_inference_steps=4,
                     generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, decoded, atol=1e-5, rtol=1e-5)
    # the pipeline's own prompt path (tokenizer + text encoder) gives the same images as the cached embeddings
    again = generate(pipe, ["a red circle", "a green square"], num_inference_steps=4,
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, images)
    cfg = generate(pipe, ["a red circle"], num_inference_steps=2, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0))
    assert cfg.shape == (1, 3, 16, 16) and torch.isfinite(cfg).all()
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_embeds"):
        generate(pipe)


class _StubPipe:
    """Stands in for a pipeline: ``encode_prompt`` returns SD's 2-tuple or SDXL's 4-tuple."""

    device = torch.device("cpu")

    def __init__(self, out) -> None:
        self.out = out

    def encode_prompt(self, prompts, **kwargs):
        assert kwargs["do_classifier_free_guidance"] is False and kwargs["num_images_per_prompt"] == 1
        return self.out


def test_encode_prompts_returns_sdxl_pooled_embeddings_for_the_cache(tmp_path):
    from mmalign.diffusion.data import load_pair_cache, save_pair_cache, sdxl_time_ids

    emb, pooled = torch.randn(2, 3, 8, dtype=torch.float16), torch.randn(2, 5)
    sd = encode_prompts(_StubPipe((emb, None)), ["a", "b"])
    assert set(sd) == {"encoder_hidden_states"} and sd["encoder_hidden_states"].dtype == torch.float32
    torch.testing.assert_close(sd["encoder_hidden_states"], emb.float())
    xl = encode_prompts(_StubPipe((emb, None, pooled, None)), ["a", "b"])  # SDXL's encode_prompt
    assert set(xl) == {"encoder_hidden_states", "text_embeds"}
    torch.testing.assert_close(xl["text_embeds"], pooled)
    # the columns go straight into an SDXL pair cache (with the micro-conditioning time ids)
    path = tmp_path / "sdxl.safetensors"
    save_pair_cache(path, {"chosen": torch.zeros(2, 4, 2, 2), "rejected": torch.ones(2, 4, 2, 2), **xl,
                           "time_ids": sdxl_time_ids((16, 16))[None].repeat(2, 1)})
    torch.testing.assert_close(load_pair_cache(path)[1]["text_embeds"], pooled[1])
    with pytest.raises(ValueError, match="_StubPipe.encode_prompt must return.*got 3 values"):
        encode_prompts(_StubPipe((emb, None, pooled)), ["a", "b"])
    with pytest.raises(ValueError, match="no pooled_prompt_embeds"):
        encode_prompts(_StubPipe((emb, None, None, None)), ["a", "b"])


def test_trained_lora_unet_inside_the_pipeline(pipe):
    from mmalign.diffusion.adapter import add_lora

    g = torch.Generator
    base = generate(pipe, ["a red circle"], num_inference_steps=2, generator=g().manual_seed(0))
    lora = add_lora(copy.deepcopy(pipe.unet), r=2)
    same = generate(with_unet(pipe, lora), ["a red circle"], num_inference_steps=2, generator=g().manual_seed(0))
    torch.testing.assert_close(same, base)  # Gaussian LoRA init has B = 0: still the base model
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    moved = generate(with_unet(pipe, lora), ["a red circle"], num_inference_steps=2, generator=g().manual_seed(0))
    assert not torch.allclose(moved, base, atol=1e-4)  # the adapters are active inside the pipeline
    from diffusion_fixtures import tiny_sd_unet

    wrong = tiny_sd_unet()
    wrong.register_to_config(in_channels=3)
    with pytest.raises(ValueError, match="latent channels"):
        with_unet(pipe, wrong)


def test_train_job_on_a_pipeline_folder_then_generate_and_score(tmp_path, pipe):
    """Cache latents + prompt embeddings, train (MaPO, 2 steps) through the job, evaluate through the pipeline."""
    from safetensors.torch import load_file

    from mmalign.diffusion.data import encode_latents, save_pair_cache
    from mmalign.diffusion.scorers import HueScorer
    from mmalign.diffusion.shapes import render
    from mmalign.diffusion.artifacts import load_unet_weights
    from mmalign.diffusion.train import DiffusionTrainConfig, run as run_train

    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    cls = torch.tensor([0, 1, 0, 1])
    chosen, rejected = render(cls, torch.full((4,), 120.0), 16, g), render(cls, torch.zeros(4), 16, g)
    prompts = ["a green circle", "a green square"] * 2
    save_pair_cache(tmp_path / "pairs.safetensors", {
        "chosen": encode_latents(pipe.vae, chosen, generator=g), "rejected": encode_latents(pipe.vae, rejected, generator=g),
        **encode_prompts(pipe, prompts)})
    cfg = DiffusionTrainConfig.from_dict({
        "method": "mapo", "model": str(folder), "data": str(tmp_path / "pairs.safetensors"),
        "eval_prompts": ["a green circle"], "eval_images_per_prompt": 2, "eval_steps": 2,
        "trainer": {"max_steps": 2, "batch_size": 2, "log_every": 1, "lr": 1e-3, "progress": False, "plots": False,
                    "cpu": True}})
    out = run_train(cfg, tmp_path / "run")
    assert out["eval/images"] == 2.0 and len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2
    trained = load_unet_weights(copy.deepcopy(pipe.unet), str(tmp_path / "run" / "model.safetensors"))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), pipe.unet.state_dict().values()))
    scores, images = evaluate_pipeline(with_unet(pipe, trained), ["a green circle"],
                                       {"green_hit": HueScorer(120.0, 40.0)}, images_per_prompt=2,
                                       num_inference_steps=2)
    assert images.shape == (2, 3, 16, 16) and 0.0 <= scores["green_hit"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])  # metrics were logged
    with pytest.raises(ValueError, match="eval_prompts needs model to be a diffusers pipeline"):
        DiffusionTrainConfig(eval_prompts=["x"])


def test_pipeline_evaluation_samples_with_the_trained_prediction_type(tmp_path, pipe, monkeypatch):
    """A v-prediction run evaluates through the folder's pipeline with a v-prediction scheduler of the same class."""
    import mmalign.diffusion.pipeline as P
    from mmalign.diffusion.data import save_pair_cache
    from mmalign.diffusion.train import DiffusionTrainConfig, run as run_train

    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    save_pair_cache(tmp_path / "pairs.safetensors", {
        "chosen": torch.zeros(2, 4, 8, 8), "rejected": torch.ones(2, 4, 8, 8),
        "encoder_hidden_states": torch.randn(2, pipe.tokenizer.model_max_length, 16)})
    seen = []

    def spy(p, prompts, scorers, **kw):
        seen.append((type(p.scheduler).__name__, p.scheduler.config.prediction_type, p.scheduler.config.beta_end))
        return {}, torch.zeros(len(prompts) * kw["images_per_prompt"], 3, 16, 16)

    monkeypatch.setattr(P, "evaluate_pipeline", spy)
    for prediction_type in ("v_prediction", ""):
        cfg = DiffusionTrainConfig.from_dict({
            "method": "sft", "model": str(folder), "data": str(tmp_path / "pairs.safetensors"),
            "prediction_type": prediction_type, "eval_prompts": ["a green circle"], "eval_images_per_prompt": 1,
            "eval_steps": 1, "trainer": {"max_steps": 1, "batch_size": 2, "log_every": 1, "progress": False,
                                         "plots": False, "cpu": True}})
        run_train(cfg, tmp_path / f"run{prediction_type}")
    assert seen and seen[0] == ("DDIMScheduler", "v_prediction", pipe.scheduler.config.beta_end)
    assert seen[-1] == ("DDIMScheduler", "epsilon", pipe.scheduler.config.beta_end)  # no override: the folder's
