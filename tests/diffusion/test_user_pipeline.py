"""Your pipeline, your pairs: a tiny SD pipeline folder trained from image-pair data, artifacts diffusers loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmalign.diffusion.pipeline import generate, tiny_sd_pipeline, with_unet
from mmalign.train.checkpoint import load_run_weights

WORDS = ["a", "red", "green", "circle", "square"]


def _image(path, color, size=(20, 24)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path.name


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    tiny_sd_pipeline(words=WORDS, image_size=16, text_dim=16).save_pretrained(folder)
    return folder


def _pickapic(folder, n=4, labels=None):
    """A Pick-a-Pic-layout JSONL with image paths next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rows.append({"caption": ["a red circle", "a green square"][i % 2],
                     "jpg_0": _image(folder / f"a{i}.png", (200, 20 + i, 20)),
                     "jpg_1": _image(folder / f"b{i}.png", (20, 200, 20 + i)),
                     "label_0": 1 if labels is None else labels[i]})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "pairs.jsonl"


def _train(pipe_dir, data, run_dir, **extra):
    from mmalign.diffusion.train import DiffusionTrainConfig, run

    trainer = {"max_steps": 2, "batch_size": 2, "log_every": 1, "lr": 1e-2, "progress": False, "plots": False,
               "cpu": True, **extra.pop("trainer", {})}
    cfg = DiffusionTrainConfig.from_dict({"method": "mapo", "model": str(pipe_dir), "data": str(data),
                                          "trainer": trainer, **extra})
    return run(cfg, run_dir)


def _images(pipe, seed=0):
    return generate(pipe, ["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(seed))


def test_lora_run_from_pickapic_jsonl_loads_in_diffusers_with_the_same_images(tmp_path, pipe_dir):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from mmalign.train.lora import add_lora

    out = _train(pipe_dir, _pickapic(tmp_path / "data"), tmp_path / "run",
                 trainer={"lora": {"enabled": True, "r": 4, "alpha": 8.0}})
    assert out["step"] == 2 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the trained model as the run left it: the base UNet with the run's adapters
    base = DiffusionPipeline.from_pretrained(pipe_dir)
    base.set_progress_bar_config(disable=True)
    trained = add_lora(copy.deepcopy(base.unet), r=4, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert state and all("lora_" in k for k in state)  # a LoRA run's final weights: the adapters only
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # the adapters moved
    load_run_weights(trained, tmp_path / "run" / "model.safetensors")
    expected = _images(with_unet(base, trained))
    loaded = DiffusionPipeline.from_pretrained(pipe_dir)
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(tmp_path / "run" / "lora")  # as a user would
    torch.testing.assert_close(_images(loaded), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_images(base), expected, atol=1e-4)  # and it differs from the base model


def test_full_unet_run_writes_unet_and_pipeline_and_continues_from_them(tmp_path, pipe_dir):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    data = _pickapic(tmp_path / "data")
    _train(pipe_dir, data, tmp_path / "run", save_pipeline=True)
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in final.items())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    base = DiffusionPipeline.from_pretrained(pipe_dir)
    base.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_images(pipe), _images(with_unet(base, unet)))
    # a run continues from its own artifacts: unet/ (full) and, below, lora/ (fused into the weights)
    _train(pipe_dir, data, tmp_path / "run2", init_weights=str(tmp_path / "run" / "unet"),
           trainer={"max_steps": 1})
    _train(pipe_dir, data, tmp_path / "lora", trainer={"max_steps": 1, "lora": {"enabled": True, "r": 2}})
    _train(pipe_dir, data, tmp_path / "run3", init_weights=str(tmp_path / "lora" / "lora"),
           trainer={"max_steps": 1, "lora": {"enabled": True, "r": 2}})


def test_data_sources_and_layouts(tmp_path, pipe_dir, monkeypatch):
    """Parquet with embedded bytes, a datasets folder, a Hub-layout folder and a Hub id (datasets.load_dataset,
    served offline), and the image kind through a column mapping."""
    import io

    import datasets
    from PIL import Image

    from mmalign.data.image_pairs import load_image_pairs

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rows = [{"prompt": "a red circle", "win": png((200, 0, 0)), "lose": png((0, 200, 0)), "label_0": 1.0},
            {"prompt": "a green square", "win": png((0, 0, 200)), "lose": png((0, 200, 9)), "label_0": 0.0}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, **kw: (
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}) if name == "someone/pairs"
        else real_load(name, split=split, **kw)))
    mapping = {"caption": "prompt", "jpg_0": "win", "jpg_1": "lose"}
    for source in (tmp_path / "pairs.parquet", tmp_path / "ds", tmp_path / "hub", "someone/pairs"):
        pairs = load_image_pairs(source, resolution=8, columns=mapping)
        assert len(pairs) == 2
        item = pairs[1]  # label_0 = 0: jpg_1 (green-ish) is the chosen image
        assert item["chosen_pixels"].shape == (3, 8, 8) and item["chosen_pixels"][1].mean() > 0.4
    image_kind = {"caption": "prompt", "chosen_image": "win", "rejected_image": "lose"}
    pairs = load_image_pairs(tmp_path / "pairs.parquet", resolution=8, layout="image",
                             columns={**image_kind, "label": "label_0"})
    assert pairs[1]["chosen_pixels"][1].mean() > 0.4  # the image kind's label orders the pair too
    out = _train(pipe_dir, tmp_path / "pairs.parquet", tmp_path / "run", columns=mapping, trainer={"max_steps": 1})
    assert out["step"] == 1


def test_bad_rows_are_named_before_training_or_dropped_and_counted(tmp_path, pipe_dir):
    from mmalign.data import DataValidationError
    from mmalign.data.image_pairs import load_image_pairs

    path = _pickapic(tmp_path / "data", n=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[1]["caption"]
    rows[2]["label_0"] = 0.7
    good = (tmp_path / "data" / rows[3]["jpg_0"]).read_bytes()
    (tmp_path / "data" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated file
    rows[3]["jpg_0"] = "cut.png"
    rows[4]["jpg_1"] = "../outside.png"
    _image(tmp_path / "outside.png", (1, 2, 3))
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataValidationError) as err:
        _train(pipe_dir, path, tmp_path / "run")
    text = str(err.value)
    for needle in ("row 1: missing field(s) ['caption']", "row 2: label_0 must be 0, 0.5 or 1", "row 3:",
                   "row 4:", "outside the data folder"):
        assert needle in text, needle
    assert "row 0" not in text and "row 5" not in text and not (tmp_path / "run" / "metrics.jsonl").exists()
    pairs = load_image_pairs(path, resolution=8, skip_invalid=True)
    assert len(pairs) == 2 and len({i for i, _ in pairs.report.dropped}) == 4


def test_ties_dropped_or_kept_half(tmp_path, pipe_dir):
    from mmalign.data.image_pairs import load_image_pairs

    path = _pickapic(tmp_path / "data", labels=[1, 0.5, 0, 0.5])
    dropped = load_image_pairs(path, resolution=8)
    assert len(dropped) == 2 and dropped.ties_dropped == 2
    kept = load_image_pairs(path, resolution=8, ties="half")
    assert [float(kept[i]["label"]) for i in range(4)] == [1.0, 0.5, 1.0, 0.5]
    out = _train(pipe_dir, path, tmp_path / "run", ties="half", method="diffusion_dpo", trainer={"max_steps": 1})
    assert out["step"] == 1


def test_soft_label_weights_both_orderings(sd_unet):
    from diffusion_fixtures import ddpm, pair_batch

    from mmalign.core.losses import mapo_loss
    from mmalign.diffusion.adapter import make_loss_fn, pair_denoising_errors, paired_noise_and_timesteps

    b = pair_batch(b=2)
    b.label = torch.tensor([1.0, 0.5])
    loss, _ = make_loss_fn("mapo", ddpm(), generator=torch.Generator().manual_seed(3))(sd_unet, b)
    noise, t = paired_noise_and_timesteps(b.chosen, 1000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        w, l_ = pair_denoising_errors(sd_unet, ddpm(), b, noise, t)
    fwd = mapo_loss(w, l_, reduction="none")[0]
    bwd = mapo_loss(l_, w, reduction="none")[0]
    expected = (fwd[0] + 0.5 * fwd[1] + 0.5 * bwd[1]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    b.label = torch.tensor([1.0, 0.2])  # not ordered chosen-first
    with pytest.raises(ValueError, match=r"label must be \[B=2\] with P\(chosen > rejected\) in \[0.5, 1\]"):
        make_loss_fn("mapo", ddpm())(sd_unet, b)


def test_latent_cache_is_keyed_by_data_and_encoder(tmp_path, pipe_dir):
    path = _pickapic(tmp_path / "data")
    cache = tmp_path / "cache"
    _train(pipe_dir, path, tmp_path / "run1", latent_cache=str(cache), trainer={"max_steps": 1})
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    _train(pipe_dir, path, tmp_path / "run2", latent_cache=str(cache), trainer={"max_steps": 1})
    assert sorted(cache.glob("*.safetensors")) == files and files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    _image(tmp_path / "data" / "a0.png", (9, 9, 9))  # the data changed: a new key
    _train(pipe_dir, path, tmp_path / "run3", latent_cache=str(cache), trainer={"max_steps": 1})
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_a_newly_registered_loss_trains_through_diffusion_train(tmp_path):
    from mmalign.registry import LOSSES

    seen = {}

    def hinge(model_err_chosen, model_err_rejected, *, margin: float = 0.0, reduction: str = "mean"):
        seen["margin"] = margin
        loss = torch.relu(margin + model_err_chosen - model_err_rejected)
        return (loss.mean() if reduction == "mean" else loss), {"hinge/active": (loss > 0).float().mean()}

    LOSSES.register("test_diffusion_hinge", hinge)
    try:
        from mmalign.diffusion.train import DiffusionTrainConfig, run

        cfg = DiffusionTrainConfig.from_dict({
            "method": "test_diffusion_hinge", "loss_options": {"margin": 0.25}, "num_pairs": 8, "image_size": 8,
            "eval_samples_per_class": 0, "trainer": {"max_steps": 2, "batch_size": 4, "log_every": 1,
                                                     "progress": False, "plots": False, "cpu": True}})
        out = run(cfg, tmp_path / "run")
    finally:
        LOSSES._entries.pop("test_diffusion_hinge")
    assert seen["margin"] == 0.25 and out["step"] == 2 and "hinge/active" in out
    assert "diffusion/model_err_chosen" in out  # every method logs the policy's errors under one name


def test_sample_command_writes_images_and_a_compare_grid(tmp_path, pipe_dir):
    from PIL import Image

    from mmalign.diffusion.sample import SampleConfig, run, validate

    _train(pipe_dir, _pickapic(tmp_path / "data"), tmp_path / "run", trainer={"max_steps": 1, "lora": {"enabled": True}})
    (tmp_path / "prompts.txt").write_text("a green square\n\n")
    cfg = SampleConfig(model=str(pipe_dir), weights=str(tmp_path / "run" / "lora"), prompts=["a red circle"],
                       prompts_file=str(tmp_path / "prompts.txt"), seeds=[0, 1], steps=2, compare=True)
    out = run(cfg, tmp_path / "samples")
    assert out["images"] == 8.0
    assert len(list((tmp_path / "samples" / "images").glob("tuned_*.png"))) == 4
    assert len(list((tmp_path / "samples" / "images").glob("base_*.png"))) == 4
    assert Image.open(tmp_path / "samples" / "grid.png").size == (2 * 16, 4 * 16)  # 2 seeds x (2 prompts x 2 models)
    with pytest.raises(ValueError, match="give prompts"):
        validate(SampleConfig(model=str(pipe_dir)))
    with pytest.raises(ValueError, match="model must name a diffusers pipeline"):
        validate(SampleConfig(prompts=["a red circle"]))


def test_cli_refuses_bad_pairs_before_making_a_run_folder(tmp_path, pipe_dir):
    from mmalign.cli import main

    path = _pickapic(tmp_path / "data", labels=[1, 1, 2, 1])
    code = main(["diffusion", "train", f"model={pipe_dir}", f"data={path}", "trainer.max_steps=1",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2 and not (tmp_path / "run").exists()
    path = _pickapic(tmp_path / "good")
    code = main(["diffusion", "train", f"model={pipe_dir}", f"data={path}", "trainer.max_steps=1",
                 "trainer.batch_size=2", "trainer.plots=false", "trainer.lora.enabled=true",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_cli_bad_init_weights_are_one_line_errors(tmp_path, pipe_dir, capsys):
    """A 0-byte safetensors file and a UNet folder holding only pickled .bin weights: exit 2, no traceback."""
    from mmalign.cli import main

    (tmp_path / "empty.safetensors").write_bytes(b"")
    binunet = tmp_path / "binunet"
    binunet.mkdir()
    (binunet / "config.json").write_text("{}")
    (binunet / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    path = _pickapic(tmp_path / "good")
    for weights, message in [(tmp_path / "empty.safetensors", "is corrupt or truncated"),
                             (binunet, "cannot read the UNet folder's safetensors weights")]:
        code = main(["diffusion", "train", f"model={pipe_dir}", f"data={path}", f"init_weights={weights}",
                     "trainer.max_steps=1", "--output-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_pair_cache_refuses_nan_labels_and_pixels_outside_the_range(tmp_path):
    from mmalign.diffusion.data import CachedPairDataset, load_pair_cache, save_pair_cache

    base = {"chosen": torch.zeros(3, 3, 4, 4), "rejected": torch.zeros(3, 3, 4, 4),
            "encoder_hidden_states": torch.zeros(3, 2, 8)}
    with pytest.raises(ValueError, match=r"labels must be .* rows \[1\] hold \[nan\]"):
        CachedPairDataset({**base, "labels": torch.tensor([1.0, float("nan"), 0.0])})
    bad = base["chosen"].clone()
    bad[2] = 255.0  # pixels in 0..255, not [-1, 1]
    with pytest.raises(ValueError, match=r"tensors\['chosen'\] rows \[2\] hold pixels outside \[-1, 1\]"):
        CachedPairDataset({**base, "chosen": bad})
    assert len(CachedPairDataset({**base, "chosen": torch.full((3, 4, 4, 4), 5.0), "rejected": torch.zeros(3, 4, 4, 4)}))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="pair cache .*empty.safetensors"):
        load_pair_cache(tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="labels must be"):
        save_pair_cache(tmp_path / "x.safetensors", {**base, "labels": torch.tensor([1.0, 2.0, 0.0])})


def test_sdxl_pipeline_trains_lora_from_image_pairs_and_loads_in_diffusers(tmp_path):
    """SDXL: two text encoders, pooled embeddings and time ids (original size, crop, target) from the data."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from mmalign.diffusion.pipeline import tiny_sdxl_pipeline
    from mmalign.train.lora import add_lora

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline(words=WORDS, image_size=16).save_pretrained(folder)
    out = _train(folder, _pickapic(tmp_path / "data"), tmp_path / "run", method="diffusion_dpo", random_crop=True,
                 trainer={"lora": {"enabled": True, "r": 2}})
    assert out["step"] == 2 and out["diffusion/ref_err_chosen"] > 0
    base = DiffusionPipeline.from_pretrained(folder)
    base.set_progress_bar_config(disable=True)
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    trained = add_lora(copy.deepcopy(base.unet), r=2, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    load_run_weights(trained, tmp_path / "run" / "model.safetensors")
    base.load_lora_weights(tmp_path / "run" / "lora")
    expected = _images(with_unet(DiffusionPipeline.from_pretrained(folder), trained))
    torch.testing.assert_close(_images(base), expected, atol=1e-5, rtol=0)


def test_v_prediction_pipeline_trains_and_samples_with_its_prediction_type(tmp_path, pipe_dir):
    from mmalign.diffusion.sample import SampleConfig, run

    out = _train(pipe_dir, _pickapic(tmp_path / "data"), tmp_path / "run", prediction_type="v_prediction",
                 trainer={"max_steps": 1, "lora": {"enabled": True}})
    assert out["step"] == 1
    cfg = SampleConfig(model=str(pipe_dir), weights=str(tmp_path / "run" / "lora"), prompts=["a red circle"],
                       steps=2, prediction_type="v_prediction")
    run(cfg, tmp_path / "samples")
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_text_encoder_lora_trains_and_loads_in_diffusers(tmp_path, pipe_dir):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from mmalign.diffusion.text_training import TextConditionedUNet
    from mmalign.train.lora import add_lora

    _train(pipe_dir, _pickapic(tmp_path / "data"), tmp_path / "run", train_text_encoder=True, method="diffusion_dpo",
           trainer={"lora": {"enabled": True, "r": 4, "alpha": 8.0}})
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("base_model.model.text_encoder.") and "lora_B" in k and v.abs().sum() > 0
               for k, v in state.items())  # the text encoder's adapters trained
    base = DiffusionPipeline.from_pretrained(pipe_dir)
    base.set_progress_bar_config(disable=True)
    stack = add_lora(TextConditionedUNet.from_pipeline(base), r=4, alpha=8.0,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"])
    load_run_weights(stack, tmp_path / "run" / "model.safetensors")
    expected = _images(base)  # base's own modules now carry the trained adapters
    loaded = DiffusionPipeline.from_pretrained(pipe_dir)
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(tmp_path / "run" / "lora")
    torch.testing.assert_close(_images(loaded), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="also holds text-encoder adapters"):
        _train(pipe_dir, tmp_path / "data" / "pairs.jsonl", tmp_path / "again",
               init_weights=str(tmp_path / "run" / "lora"))


def test_reference_encodes_prompts_with_the_reference_text_encoder(pipe_dir):
    """Diffusion-DPO with LoRA on the text encoder: the reference's conditioning is the adapters-disabled encoder's."""
    from diffusers import DiffusionPipeline
    from diffusion_fixtures import ddpm

    from mmalign.diffusion.adapter import PairBatch, conditioned, pair_denoising_errors, reference_pair_errors
    from mmalign.diffusion.text_training import TextConditionedUNet, prompt_embedder
    from mmalign.train.lora import add_lora

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    base_unet = copy.deepcopy(pipe.unet)
    base_text = copy.deepcopy(pipe.text_encoder)
    model = add_lora(TextConditionedUNet.from_pipeline(pipe), r=2, target_modules=["q_proj", "v_proj"], init="gaussian")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the text embedding
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), None,
                      captions=["a red circle", "a green square"])
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    embed = prompt_embedder(pipe)
    ref_w, _ = reference_pair_errors(model, None, ddpm(), batch, noise, t, embed)
    plain = TextConditionedUNet(base_unet, base_text)
    with torch.no_grad():
        want_w, _ = pair_denoising_errors(plain, ddpm(), conditioned(batch, plain, embed), noise, t)
        policy_w, _ = pair_denoising_errors(model, ddpm(), conditioned(batch, model, embed), noise, t)
    torch.testing.assert_close(ref_w, want_w)
    assert not torch.allclose(policy_w, want_w)  # the policy's own (adapted) encoder conditions differently


def test_full_run_with_text_encoder_writes_it(tmp_path, pipe_dir):
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel

    _train(pipe_dir, _pickapic(tmp_path / "data"), tmp_path / "run", train_text_encoder=True, save_pipeline=True,
           trainer={"max_steps": 1})
    base = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder")
    trained = CLIPTextModel.from_pretrained(tmp_path / "run" / "text_encoder")
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    torch.testing.assert_close(pipe.text_encoder.state_dict(), trained.state_dict())
    with pytest.raises(ValueError, match="train_text_encoder needs a pipeline model and image-pair data"):
        _train(pipe_dir, tmp_path / "data" / "pairs.jsonl", tmp_path / "x", train_text_encoder=True,
               latent_cache=str(tmp_path / "cache"))


def test_flipped_pairs_repeat_in_a_fresh_run(tmp_path, pipe_dir):
    """hflip draws from the global RNGs (num_workers=0), which the job seeds: two runs log the same losses."""
    data = _pickapic(tmp_path / "data", n=8)

    def losses(run):
        _train(pipe_dir, data, tmp_path / run, hflip=True, trainer={"max_steps": 3, "batch_size": 4})
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    first = losses("a")
    torch.rand(5)  # whatever drew from the global RNG before the second run
    assert losses("b") == first
