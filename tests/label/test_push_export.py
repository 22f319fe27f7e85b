"""``mmalign label push`` then answers then ``mmalign label export``: a preference file mmalign.data reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sqlalchemy")

from mmalign.cli import main  # noqa: E402
from mmalign.data import load_preference_data  # noqa: E402
from mmalign.label.jobs import open_store, ExportConfig  # noqa: E402


def _write_data(folder: Path, kind: str) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        if kind == "text":
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"p{i}.png")
            rows.append({"prompt": f"What is in picture {i}?", "images": [f"p{i}.png"],
                         "chosen": f"A dark square number {i}", "rejected": f"A bright circle number {i}"})
        elif kind == "image":
            for side, c in (("a", 10), ("b", 200)):
                Image.fromarray(np.full((8, 8, 3), c + i, np.uint8)).save(folder / f"{side}{i}.png")
            rows.append({"caption": f"a dark tile {i}", "chosen_image": f"a{i}.png", "rejected_image": f"b{i}.png"})
        else:
            rng = np.random.default_rng(i)
            rows.append({"obs_first": rng.normal(size=(4, 3)).tolist(), "act_first": rng.normal(size=(4, 2)).tolist(),
                         "obs_second": rng.normal(size=(4, 3)).tolist(), "act_second": rng.normal(size=(4, 2)).tolist(),
                         "frames_first": rng.integers(0, 255, (4, 16, 16, 3)).tolist(),
                         "frames_second": rng.integers(0, 255, (4, 16, 16, 3)).tolist(), "label": 1.0})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind,data_kind", [("text", "text"), ("image", "image"), ("clip", "segment")])
def test_push_answer_export_round_trip(tmp_path: Path, kind: str, data_kind: str) -> None:
    data = _write_data(tmp_path / "data", kind)
    folder = tmp_path / "labels"
    common = [f"folder={folder}"]
    args = ["label", "push", "--output-dir", str(tmp_path / "run-push"), *common, f"project={kind}",
            f"data={data}", f"kind={kind}", "reference_labels=true"]
    assert main(args) == 0
    assert main([*args[:3], str(tmp_path / "run-push2"), *args[4:]]) == 0  # pushing again adds nothing
    store = open_store(ExportConfig(folder=str(folder), project=kind, output="x"))
    assert store.counts(kind)["queries"] == 3
    lid = store.authenticate(store.add_labeller("alice"))[0]
    for choice in ("left", "right", "skip"):
        q = store.lease(kind, lid)
        store.submit(lid, f"sub-{choice}-{q.query_id:04d}", q.query_id, choice, comment="because")
    expected = sorted(a["label"] for a in store.answers(kind) if a["label"] is not None)
    store.close()
    out = tmp_path / "export" / "answers.jsonl"
    assert main(["label", "export", "--output-dir", str(tmp_path / "run-exp"), *common, f"project={kind}",
                 f"output={out}"]) == 0
    ds = load_preference_data(out, data_kind)
    assert len(ds) == 2 and sorted(ds.labels()) == expected  # the skipped query is left out
    assert all(r["comments"] == ["because"] for r in ds.rows)
    if kind == "image":
        assert all((out.parent / r["chosen_image"]).is_file() for r in ds.rows)
        from mmalign.data.image_pairs import load_image_pairs  # what `diffusion train data=...` reads with

        assert len(load_image_pairs(out, resolution=8, layout="image")) == sum(y != 0.5 for y in expected)
    # nothing is overwritten
    assert main(["label", "export", "--output-dir", str(tmp_path / "run-exp2"), *common, f"project={kind}",
                 f"output={out}"]) == 2


def test_push_refuses_invalid_data_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    assert main(["label", "push", "--output-dir", str(tmp_path / "r"), f"folder={tmp_path / 'labels'}",
                 "project=p", f"data={bad}", "kind=text"]) == 2
    assert "rejected" in capsys.readouterr().err
    assert not (tmp_path / "labels" / "labels.db").exists()
