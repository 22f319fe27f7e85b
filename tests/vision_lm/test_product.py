"""The user's path: model folder + data file in, chat-templated prompts, artifacts transformers/peft load out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.train.checkpoint import load_run_weights
from mmalign.vision_lm.train import VLMTrainConfig, run

WORDS = ["a", "big", "small", "red", "blue", "green", "circle", "square", "describe", ":", ".", "yes", "no", "is",
         "there"]
# A chat template in the tokenizer's words; its marks (" :" after the user turn) show it was applied.
TEMPLATE = ("{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}IMG {% else %}"
            "{{ p['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}:{% endif %}")
CONV = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]


def _qwen(version: str):
    """A tiny Qwen2-VL / Qwen2.5-VL with a word-level tokenizer and the real processor classes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>",
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    sizes = dict(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2, temporal_patch_size=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                vocab_size=len(vocab), max_position_embeddings=256, bos_token_id=2, eos_token_id=2, pad_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig as Cfg, Qwen2VLImageProcessor as IP, Qwen2VLProcessor as Proc
        from transformers import Qwen2VLVideoProcessor as VP

        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3)
    else:
        from transformers import Qwen2_5_VLConfig as Cfg, Qwen2_5_VLProcessor as Proc, Qwen2VLImageProcessor as IP
        from transformers import Qwen2VLVideoProcessor as VP

        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3, window_size=32, fullatt_block_indexes=[0])
    vision["out_hidden_size"] = 32
    proc = Proc(image_processor=IP(**sizes), tokenizer=tok, video_processor=VP(**sizes))
    cfg = Cfg(text_config=text, vision_config=vision, image_token_id=5, video_token_id=6, vision_start_token_id=3,
              vision_end_token_id=4)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg), proc


def tiny_folder(family: str, folder: Path, template: bool = True) -> Path:
    """A tiny random-init VLM of ``family`` saved with its processor (and a chat template) as a model folder."""
    if family.startswith("qwen"):
        model, proc = _qwen(family)
        image = "<|vision_start|> <|image_pad|> <|vision_end|> "
    else:
        from mmalign.vision_lm.families import build_tiny_vlm

        model, proc = build_tiny_vlm(family, WORDS, seed=0, patch_size=16 if family == "llava_next" else 8)
        image = "<image> "
    if template:
        proc.chat_template = TEMPLATE.replace("IMG ", image)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def pairs_file(folder: Path, n: int = 4, conversational: bool = True, **extra) -> Path:
    """``n`` preference pairs over generated 32x32 images, as JSONL next to the images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        if conversational:
            rows.append({"prompt": CONV, "chosen": [{"role": "assistant", "content": "a big red circle ."}],
                         "rejected": [{"role": "assistant", "content": "a small blue square ."}],
                         "images": [f"im{i}.png"], **extra})
        else:
            rows.append({"prompt": "describe", "chosen": "a big red circle .", "rejected": "a small blue square .",
                         "images": [f"im{i}.png"], **extra})
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def cfg(model: Path | str, data: Path | str, **kw) -> VLMTrainConfig:
    trainer = {"max_steps": 2, "batch_size": 2, "lr": 0.02, "progress": False, "plots": False, "cpu": True,
               "log_every": 1, "lora": {"enabled": True, "r": 4, "alpha": 8.0}}
    trainer.update(kw.pop("trainer", {}))
    return VLMTrainConfig.from_dict({"model_path": str(model), "data": str(data), "max_length": 512,
                                     "trainer": trainer, **kw})


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return tiny_folder("llava", tmp_path_factory.mktemp("llava"))


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"])
def test_every_family_trains_a_step_from_a_chat_templated_prompt(family: str, tmp_path: Path) -> None:
    from mmalign.vision_lm.loading import load_processor
    from mmalign.vision_lm.train import prepare_pairs

    model_dir = tiny_folder(family, tmp_path / "model")
    c = cfg(model_dir, pairs_file(tmp_path / "data"), trainer={"max_steps": 1})
    pairs, _, stats = prepare_pairs(c, load_processor(str(model_dir)))
    assert pairs[0].prompt.endswith("describe :") and "user" not in pairs[0].prompt  # the template, not the fallback
    out = run(c, tmp_path / "run")
    assert out["step"] == 1 and math.isfinite(out["train/loss"]) and out["data/oov_rate"] == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_plain_fallback_without_a_chat_template(tmp_path: Path) -> None:
    from mmalign.vision_lm.loading import load_processor
    from mmalign.vision_lm.prompts import format_prompt

    proc = load_processor(str(tiny_folder("llava", tmp_path / "m", template=False)))
    assert format_prompt(proc, "describe", 2) == "<image> <image> describe"
    assert format_prompt(proc, "<image> describe", 1) == "<image> describe"  # already formatted: kept
    assert format_prompt(proc, CONV, 1) == "user: <image> describe\nassistant:"


def _logits(model, proc, image_path: Path) -> torch.Tensor:
    from PIL import Image

    from mmalign.vision_lm.prompts import format_prompt

    enc = proc(text=[format_prompt(proc, CONV, 1)], images=[[Image.open(image_path).convert("RGB")]],
               return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def test_artifacts_reload_and_reproduce_the_trained_logits(llava_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.train.lora import add_lora

    data = pairs_file(tmp_path / "data")
    out = run(cfg(llava_dir, data, merge=True, trainer={"save_every": 1}), tmp_path / "lora")
    adapter_dir, merged_dir = Path(out["artifact/adapter"]), Path(out["artifact/merged"])
    assert sorted(p.name for p in adapter_dir.glob("adapter_*")) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    assert all("lora_" in k for k in load_file(str(adapter_dir / "adapter_model.safetensors")))  # adapters only
    assert (tmp_path / "lora" / "artifacts" / "step-000001" / "adapter" / "adapter_model.safetensors").is_file()
    proc = AutoProcessor.from_pretrained(adapter_dir)
    img = data.parent / "im0.png"
    # the trained model: base + LoRA with the trainer's final weights
    trained = add_lora(AutoModelForImageTextToText.from_pretrained(llava_dir), r=4, alpha=8.0)
    load_run_weights(trained, tmp_path / "lora" / "model.safetensors")  # the run's file: adapters only
    want = _logits(trained, proc, img)
    base_logits = _logits(AutoModelForImageTextToText.from_pretrained(llava_dir), proc, img)
    assert (want - base_logits).abs().max() > 1e-3  # training changed the model
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava_dir), adapter_dir)
    torch.testing.assert_close(_logits(loaded, proc, img), want, atol=1e-5, rtol=0)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    torch.testing.assert_close(_logits(merged, proc, img), want, atol=1e-5, rtol=0)
    # full fine-tuning: save_pretrained of the whole model
    out = run(cfg(llava_dir, data, reference="cache", trainer={"lora": {"enabled": False}, "lr": 1e-3}),
              tmp_path / "full")
    full_model = AutoModelForImageTextToText.from_pretrained(out["artifact/model"])
    ref = AutoModelForImageTextToText.from_pretrained(llava_dir)
    ref.load_state_dict(load_file(str(tmp_path / "full" / "model.safetensors")))
    torch.testing.assert_close(_logits(full_model, proc, img), _logits(ref, proc, img), atol=1e-5, rtol=0)


def test_adapter_folder_is_under_5_percent_of_the_model(tmp_path: Path) -> None:
    """A small (not tiny) model: 2-layer 256-wide decoder, LoRA r=8 on the attention projections."""
    from mmalign.train.lora import add_lora
    from mmalign.vision_lm.artifacts import save_artifacts
    from mmalign.vision_lm.families import build_tiny_vlm

    model, proc = build_tiny_vlm("smolvlm", WORDS, seed=0, text_dim=256, vision_dim=128, heads=4, text_layers=2,
                                 vision_layers=2)
    model.save_pretrained(tmp_path / "full")
    written = save_artifacts(add_lora(model, r=8, alpha=16), proc, tmp_path / "out")
    full = sum(p.stat().st_size for p in (tmp_path / "full").glob("*.safetensors"))
    adapter = (Path(written["adapter"]) / "adapter_model.safetensors").stat().st_size
    assert adapter < 0.05 * full, (adapter, full)


def test_a_newly_registered_loss_trains_through_vlm_train(llava_dir: Path, tmp_path: Path) -> None:
    import torch.nn.functional as F

    from mmalign.cli import run_job
    from mmalign.registry import LOSSES

    calls = []

    def hinge_dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                  reduction="mean"):
        """A test loss: hinge on the DPO margin."""
        margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        loss = F.relu(1 - beta * margin)
        calls.append(beta)
        return (loss.mean() if reduction == "mean" else loss), {"rewards/margin": margin.detach().mean()}

    LOSSES.register("test_hinge_dpo", hinge_dpo)
    try:
        data = pairs_file(tmp_path / "data")
        trainer = {"max_steps": 1, "batch_size": 2, "progress": False, "plots": False, "cpu": True}
        out = run_job("vlm.train", None, [f"model_path={llava_dir}", f"data={data}", "method=test_hinge_dpo",
                                          "beta=0.3", "max_length=512"] +
                      [f"trainer.{k}={v}" for k, v in trainer.items()], str(tmp_path / "run"), False)
        assert out["step"] == 1 and calls and all(b == 0.3 for b in calls)
        with pytest.raises(ValueError, match="not the pairwise sequence log-probs"):
            VLMTrainConfig.from_dict({"method": "cpl"})
    finally:
        LOSSES._entries.pop("test_hinge_dpo")


def test_labels_are_honoured(llava_dir: Path, tmp_path: Path) -> None:
    """Label 0 swaps the pair; a soft label is a soft target: l·loss(c, r) + (1 − l)·loss(r, c) (BCE for DPO)."""
    from mmalign.data import load_preference_data
    from mmalign.vision_lm.loading import load_processor
    from mmalign.vision_lm.objectives import PreferenceObjective
    from mmalign.vision_lm.pairs import pairs_from_data

    data_path = pairs_file(tmp_path / "data", n=2, conversational=False)
    rows = [json.loads(x) for x in data_path.read_text().splitlines()]
    rows[0]["label"], rows[1]["label"] = 0.0, 0.7
    data_path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = pairs_from_data(load_preference_data(data_path, "text"), load_processor(str(llava_dir)))
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].label) == ("a small blue square .", "a big red circle .", 1.0)
    assert pairs[1].chosen == "a big red circle ." and pairs[1].label == pytest.approx(0.7)
    obj = PreferenceObjective.__new__(PreferenceObjective)
    obj.method, obj.beta, obj.eps = "dpo", 0.5, 0.1
    pol = [torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)]
    ref = [torch.tensor([-2.0, -2.0], dtype=torch.float64), torch.tensor([-2.0, -2.0], dtype=torch.float64)]
    labels = torch.tensor([1.0, 0.7], dtype=torch.float64)
    loss, _ = obj._pairwise(pol, ref, (torch.ones(2), torch.ones(2)), labels)
    delta = 0.5 * torch.tensor([(-1 + 2) - (-3 + 2), (-2 + 2) - (-1 + 2)], dtype=torch.float64)
    want = -(labels * F_logsigmoid(delta) + (1 - labels) * F_logsigmoid(-delta)).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    hard, _ = obj._pairwise(pol, ref, (torch.ones(2), torch.ones(2)), torch.ones(2, dtype=torch.float64))
    assert hard.item() == pytest.approx(-F_logsigmoid(delta).mean().item(), abs=1e-12)


def F_logsigmoid(x: torch.Tensor) -> torch.Tensor:  # noqa: N802
    return torch.nn.functional.logsigmoid(x)


def test_bad_inputs_fail_before_any_work(llava_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmalign.data import DataValidationError
    from mmalign.vision_lm import loading

    def no_weights(*a, **k):  # every check below must come before the user's weights load
        raise AssertionError("the model's weights were loaded before the data was checked")

    monkeypatch.setattr(loading, "load_vlm", no_weights)

    data = pairs_file(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        run(cfg(tmp_path / "missing_model", data), tmp_path / "r1")
    with pytest.raises(FileNotFoundError, match="not found"):  # tiny model: fails before its SFT phase
        run(VLMTrainConfig.from_dict({"data": str(tmp_path / "nope.jsonl"), "sft_steps": 5}), tmp_path / "r2")
    assert not (tmp_path / "r2" / "sft").exists()
    (data.parent / "im1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataValidationError, match="row 1: unreadable image 'images\\[0\\]'"):
        run(cfg(llava_dir, data), tmp_path / "r3")
    assert not (tmp_path / "r3" / "checkpoints").exists()
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[2]["chosen"] = [{"role": "assistant", "content": "zebra giraffe okapi"}]
    data.write_text("\n".join(json.dumps(r) for r in rows[2:]))
    with pytest.raises(ValueError, match="unknown to the tokenizer .*'zebra'"):
        run(cfg(llava_dir, data), tmp_path / "r4")
    with pytest.raises(DataValidationError, match="row 0: over-long pair"):
        run(cfg(llava_dir, data, max_length=8), tmp_path / "r5")


def test_resume_does_not_repeat_the_sft_phase(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    c = VLMTrainConfig.from_dict({"sft_steps": 2, "n_scenes": 8, "max_length": 64, "trainer": {
        "max_steps": 1, "batch_size": 4, "progress": False, "plots": False, "cpu": True,
        "lora": {"enabled": True, "r": 4, "alpha": 8.0}}})
    run(c, tmp_path)
    sft_metrics = (tmp_path / "sft" / "metrics.jsonl").read_text()
    (tmp_path / "adapter").rename(tmp_path / "adapter_first")
    out = run(c, tmp_path, resume=True)
    assert "SFT phase already finished" in capsys.readouterr().out
    assert (tmp_path / "sft" / "metrics.jsonl").read_text() == sft_metrics and out["step"] == 1
    from safetensors.torch import load_file

    first = load_file(str(tmp_path / "adapter_first" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def _vlm_imports(module: str) -> set[str]:
    """The mmalign.vision_lm modules ``module`` imports anywhere (top level or inside functions)."""
    import ast

    import mmalign.vision_lm as pkg

    tree = ast.parse((Path(pkg.__file__).parent / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmalign.vision_lm"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out.update(n.removeprefix("mmalign.vision_lm.") for n in names)
    return out


def test_training_depends_on_no_benchmark_code_and_tiny_not_on_families() -> None:
    for module in ("train", "objectives", "adapter", "pairs", "prompts", "artifacts", "loading", "generation",
                   "testbed", "refcache", "methods", "jobs"):
        if (Path(__file__).parents[2] / "mmalign" / "vision_lm" / f"{module}.py").exists():
            assert "benchmark" not in _vlm_imports(module), module
    assert not {"families", "testbed", "benchmark"} & _vlm_imports("tiny")


def test_generate_and_eval_from_an_adapter_folder(llava_dir: Path, tmp_path: Path) -> None:
    from mmalign.cli import run_job

    data = pairs_file(tmp_path / "data")
    trained = run(cfg(llava_dir, data, trainer={"max_steps": 1}), tmp_path / "train")
    rows = [{"image": f"im{i}.png", "question": "is there a red circle", "answer": a}
            for i, a in enumerate(["yes", "no", "Yes.", "no"])]
    (tmp_path / "data" / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gen = run_job("vlm.generate", None, [f"model_path={trained['artifact/adapter']}", f"data={data}",
                                         "max_new_tokens=4", "batch_size=3"], str(tmp_path / "gen"), False)
    lines = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert gen["n"] == 4 and [x["row"] for x in lines] == [0, 1, 2, 3] and all("generated" in x for x in lines)
    out = run_job("vlm.eval", None, [f"model_path={trained['artifact/adapter']}",
                                     f"data={tmp_path / 'data' / 'pope.jsonl'}"], str(tmp_path / "eval"), False)
    answers = [json.loads(x) for x in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and out["eval/n"] == 4
    # the metrics follow from the written answers (a random tiny model rarely says yes or no: unparsed = wrong)
    correct = [a["correct"] for a in answers]
    assert out["eval/acc"] == pytest.approx(np.mean(correct))
    assert out["eval/unparsed_ratio"] == pytest.approx(np.mean([a["predicted"] is None for a in answers]))
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == out
    rows[1]["answer"] = "maybe"
    (tmp_path / "data" / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from mmalign.data import DataValidationError

    with pytest.raises(DataValidationError, match="row 1: answer must be yes or no, got 'maybe'"):
        run_job("vlm.eval", None, [f"model_path={trained['artifact/adapter']}",
                                   f"data={tmp_path / 'data' / 'pope.jsonl'}"], str(tmp_path / "eval2"), False)


def test_pope_answer_parsing_and_metrics() -> None:
    from mmalign.vision_lm.pope import parse_yes_no, pope_metrics

    assert [parse_yes_no(t) for t in ("Yes.", " no, there is none", "I think so", "", "NO")] == \
        [True, False, None, None, False]
    m = pope_metrics(np.array([True, True, False, False]), np.array([True, False, False, False]))
    assert m == {"acc": 0.75, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "yes_ratio": 0.5}


def test_shipped_user_config_loads() -> None:
    from mmalign.config import load_config

    path = Path(__file__).parents[2] / "configs" / "vision_lm" / "train_smolvlm_rlaif_v.yaml"
    cfg = load_config(VLMTrainConfig, str(path), [])
    assert cfg.columns == {"prompt": "question", "images": "image"} and cfg.trainer.lora.enabled


def test_models_by_folder_or_hub_id(llava_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmalign.vision_lm.loading import check_model_source, hub_offline, load_vlm, resolve_dtype

    assert check_model_source(str(llava_dir)) is True
    assert check_model_source("HuggingFaceTB/SmolVLM-256M-Instruct") is False  # a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        check_model_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        check_model_source("./not/there")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_offline()
    with pytest.raises(OSError):  # offline and not cached: transformers refuses, nothing is downloaded
        load_vlm("nobody-xyz/no-such-vlm", device="cpu")
    model, _ = load_vlm(str(llava_dir), device="cpu", dtype="float32", lora={"r": 2, "alpha": 4})
    assert hasattr(model, "disable_adapter") and model.dtype == torch.float32


def test_full_fine_tuning_with_the_update_inside_backward_trains_the_same_model(llava_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """`trainer.optimizer_in_backward` through vlm train (images encoded once for both branches, tied weights):
    the weights equal those of the plain optimizer step."""
    from safetensors.torch import load_file

    data = pairs_file(tmp_path / "data")
    weights = []
    for inside in (False, True):
        trainer = {"lora": {"enabled": False}, "lr": 1e-3, "max_grad_norm": 0.0, "optimizer_in_backward": inside}
        run(cfg(llava_dir, data, reference="cache", trainer=trainer), tmp_path / str(inside))
        weights.append(load_file(str(tmp_path / str(inside) / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_trains_the_same_model(llava_dir: Path, tmp_path: Path, lora: bool) -> None:
    """`trainer.gradient_checkpointing` through vlm train: the vision tower's and the decoder's layers recompute
    in the backward pass (images encoded once, spliced into both branches) and the weights equal a plain run's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    from transformers.modeling_layers import GradientCheckpointingLayer

    from mmalign.train.trainer import enable_gradient_checkpointing

    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    enable_gradient_checkpointing(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert {type(m).__name__ for m in layers} >= {"CLIPEncoderLayer", "LlamaDecoderLayer"}
    assert all(m.gradient_checkpointing for m in layers)  # the vision tower's layers and the decoder's
    data = pairs_file(tmp_path / "data")
    weights = []
    for ckpt in (False, True):
        trainer = {"lora": {"enabled": lora, "r": 4, "alpha": 8.0}, "lr": 1e-3, "gradient_checkpointing": ckpt}
        run(cfg(llava_dir, data, reference="lora" if lora else "cache", trainer=trainer), tmp_path / str(ckpt))
        weights.append(load_file(str(tmp_path / str(ckpt) / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=0, rtol=0, msg=k)
