"""``mmalign vlm generate`` and ``mmalign vlm eval``: answers of a trained (or any) VLM for the user's prompts.

``model_path`` is a model folder, a Hub id, a ``merged/`` folder, or an ``adapter/`` folder (loaded onto the base
model its config names, or ``base_model``). Data: any :mod:`mmalign.data` source of prompt rows (``prompt``, optional
``images``; other layouts through ``columns``), validated before the model is loaded, images decoded per batch.

- ``vlm generate`` writes ``generations.jsonl`` (row number, prompt, generated answer, and the row's other text
  fields) and returns the count.
- ``vlm eval`` is POPE-style: rows of ``image``, ``question``, ``answer`` (yes/no; mapped by default with
  ``columns.prompt=question columns.images=image``); it writes ``answers.jsonl`` (prediction, parsed yes/no,
  correct) and ``eval.json`` with accuracy, precision, recall, F1, yes-ratio and the fraction of answers that were
  neither yes nor no (counted as wrong).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option

__all__ = ["GenerateConfig", "EvalConfig", "run_generate", "run_eval"]


@dataclass
class GenerateConfig(Config):
    """Generate answers for prompts over images from a data file."""

    model_path: str = option("", "model folder, Hub id, merged/ or adapter/ folder written by vlm train")
    base_model: str = option("", "base model of an adapter folder (default: the one its adapter_config.json names)")
    data: str = option("", "prompt rows: .jsonl/.json/.parquet, a datasets folder or a Hub id")
    columns: dict[str, str] = option({}, "column mapping {expected field: column}, e.g. columns.prompt=question")
    split: str = option("", "split of a datasets folder or Hub data set")
    allow_outside_paths: bool = option(False, "let image paths leave the data file's folder")
    skip_invalid: bool = option(False, "drop (and count) invalid rows instead of raising")
    max_new_tokens: int = option(64, "longest answer in tokens")
    temperature: float = option(0.0, "0 = greedy; > 0 samples at this temperature (seeded)")
    batch_size: int = option(8, "prompts per generate call")
    seed: int = option(0, "seed of sampling")
    dtype: str = option("auto", "auto (bf16 on GPUs that support it, else fp32), float32, bfloat16")
    trust_remote_code: bool = option(False, "let transformers run the model repository's own code")

    def __post_init__(self) -> None:
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("batch_size", self.batch_size)
        check_nonnegative("temperature", self.temperature)
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class EvalConfig(GenerateConfig):
    """POPE-style yes/no evaluation on rows of image, question, answer."""

    columns: dict[str, str] = option({"prompt": "question", "images": "image"},
                                     "column mapping {expected field: column}; the answer column is 'answer'")
    max_new_tokens: int = option(8, "longest answer in tokens (only its first word is read)")


def _rows(cfg: GenerateConfig) -> Any:
    """The validated prompt rows (checked with the model source before any model is loaded)."""
    from mmalign.data import load_preference_data
    from mmalign.vision_lm.loading import check_model_source

    if not cfg.data:
        raise ValueError("data must name the prompt rows (a .jsonl/.parquet file, a datasets folder or a Hub id)")
    check_model_source(cfg.model_path)  # an empty model_path is refused here too
    data = load_preference_data(cfg.data, "prompt", columns=cfg.columns, split=cfg.split or None,
                                skip_invalid=cfg.skip_invalid, allow_outside=cfg.allow_outside_paths)
    if len(data) == 0:
        raise ValueError(f"{cfg.data} holds no valid prompt rows")
    return data


def _answers(cfg: GenerateConfig, data: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows (with their row numbers under ``_row``) and the model's answers."""
    import torch

    from mmalign.data import LazyImage
    from mmalign.vision_lm.adapter import VLExample, VLMAdapter
    from mmalign.vision_lm.loading import load_for_inference
    from mmalign.vision_lm.prompts import format_prompt

    model, processor = load_for_inference(cfg.model_path, base_model=cfg.base_model, dtype=cfg.dtype,
                                          trust_remote_code=cfg.trust_remote_code)
    adapter = VLMAdapter(model, processor)
    gen = torch.Generator().manual_seed(cfg.seed)
    answers: list[str] = []
    rows = [dict(r) for r in data.rows]
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        examples = []
        for row in chunk:
            refs = row.get("images") or []
            images = [LazyImage(v, data.base_dir, data.allow_outside).load() for v in refs]
            examples.append(VLExample(format_prompt(processor, row["prompt"], len(images)), "", images))
        # the adapter wants every example of a call with or without images: split mixed batches
        for has in (True, False):
            idx = [k for k, ex in enumerate(examples) if bool(ex.images) == has]
            if not idx:
                continue
            texts = adapter.generate([examples[k] for k in idx], max_new_tokens=cfg.max_new_tokens,
                                     temperature=cfg.temperature, generator=gen)
            for k, text in zip(idx, texts):
                chunk[k]["_answer"] = text
        answers += [row.pop("_answer") for row in chunk]
    for i, row in enumerate(rows):
        row["_row"] = data.row_number(i)
    return rows, answers


def _text_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}


def run_generate(cfg: GenerateConfig, run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    rows, answers = _answers(cfg, _rows(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "generations.jsonl", "w") as fh:
        for row, text in zip(rows, answers):
            fh.write(json.dumps({"row": row["_row"], **_text_fields(row), "generated": text}) + "\n")
    return {"n": len(answers), "generations": str(run_dir / "generations.jsonl")}


def run_eval(cfg: EvalConfig, run_dir: Path) -> dict[str, Any]:
    import numpy as np

    from mmalign.vision_lm.pope import parse_yes_no, pope_metrics

    from mmalign.data import DataValidationError

    run_dir = Path(run_dir)
    data = _rows(cfg)
    bad = []  # the answers are checked before the model is loaded, naming the rows
    for i, row in enumerate(data.rows):
        if parse_yes_no(str(row.get("answer", ""))) is None:
            bad.append((data.row_number(i), f"answer must be yes or no, got {row.get('answer')!r}"))
    if bad:
        raise DataValidationError(bad, data.report.total, cfg.data)
    rows, answers = _answers(cfg, data)
    truth = np.array([bool(parse_yes_no(str(r["answer"]))) for r in rows])
    parsed = [parse_yes_no(a) for a in answers]
    # an answer that is neither yes nor no is wrong whatever the truth: predict the opposite of the truth
    pred = np.array([p if p is not None else not t for p, t in zip(parsed, truth)])
    metrics = {f"eval/{k}": v for k, v in pope_metrics(pred, truth).items()}
    metrics["eval/unparsed_ratio"] = float(np.mean([p is None for p in parsed]))
    metrics["eval/yes_ratio"] = float(np.mean([p is True for p in parsed]))  # of the answers given, not the fill-in
    metrics["eval/n"] = float(len(rows))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "answers.jsonl", "w") as fh:
        for row, text, p, y in zip(rows, answers, parsed, truth):
            fh.write(json.dumps({"row": row["_row"], **_text_fields(row), "generated": text,
                                 "predicted": None if p is None else ("yes" if p else "no"),
                                 "correct": p is not None and p == y}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
