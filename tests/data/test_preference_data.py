"""Preference data loaders and validation: every bad-row case, every format, skip_invalid accounting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmalign.data import DataValidationError, load_preference_data, validate_rows, write_jsonl


def _png(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def _text_rows(tmp_path: Path) -> list[dict]:
    img = _png(tmp_path / "a.png")
    return [
        {"prompt": "What is shown?", "chosen": "A red circle.", "rejected": "A blue square.", "images": [img.name],
         "label": None},
        # every row carries every column: datasets.Dataset.from_list infers columns from the first row only
        {"prompt": "Count.", "chosen": "Two.", "rejected": "Three.", "images": None, "label": 0.8},
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
        ({"prompt": "p", "chosen": "   ", "rejected": "r"}, "empty response in 'chosen'"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "images": ["missing.png"]}, "unreadable image"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": 1.5}, "label 1.5 outside [0, 1]"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": float("nan")}, "label is NaN"),
    ],
)
def test_text_bad_rows_are_reported_by_index_and_reason(tmp_path: Path, row: dict, reason: str) -> None:
    rows = [*_text_rows(tmp_path), row]
    with pytest.raises(DataValidationError) as err:
        validate_rows("text", rows, base_dir=tmp_path)
    assert err.value.problems[0][0] == 2
    assert reason in err.value.problems[0][1]
    assert "row 2:" in str(err.value)


def test_image_pairs_bad_rows(tmp_path: Path) -> None:
    good = {"caption": "a cat", "chosen_image": str(_png(tmp_path / "c.png")),
            "rejected_image": str(_png(tmp_path / "r.png"))}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    rows = [
        good,
        {**good, "chosen_image": str(broken)},
        {**good, "rejected_image": str(_png(tmp_path / "big.png", (16, 8)))},
        {**good, "chosen_image": np.full((4, 4, 3), np.nan)},
        {"caption": "x", "chosen_image": str(tmp_path / "c.png")},
    ]
    with pytest.raises(DataValidationError) as err:
        validate_rows("image", rows)
    reasons = dict(err.value.problems)
    assert "unreadable image 'chosen_image'" in reasons[1]
    assert "differs from rejected_image size" in reasons[2]
    assert "contains NaN or inf" in reasons[3]
    assert "missing field 'rejected_image'" in reasons[4]
    assert 0 not in reasons


def test_segment_pairs_bad_rows() -> None:
    good = {"obs_first": np.zeros((5, 3)), "act_first": np.zeros((5, 2)), "rewards_first": np.zeros(5),
            "obs_second": np.zeros((5, 3)), "act_second": np.zeros((5, 2)), "label": 0.5}
    rows = [
        good,
        {**good, "act_first": np.zeros((4, 2))},
        {**good, "obs_second": np.array([[np.nan, 0.0, 0.0]] * 5)},
        {**good, "label": -0.1},
        {k: v for k, v in good.items() if k != "act_second"},
    ]
    with pytest.raises(DataValidationError) as err:
        validate_rows("segment", rows)
    reasons = dict(err.value.problems)
    assert "mismatched lengths in the first segment" in reasons[1]
    assert "'obs_second' contains NaN" in reasons[2]
    assert "label -0.1 outside [0, 1]" in reasons[3]
    assert "missing field 'act_second'" in reasons[4]
    kept, report = validate_rows("segment", rows, skip_invalid=True)
    assert len(kept) == 1 and report.kept == 1 and report.total == 5
    assert "dropped 4 invalid rows" in report.summary()


def test_jsonl_parquet_and_datasets_folder_load_the_same(tmp_path: Path) -> None:
    rows = _text_rows(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from datasets import Dataset

    folder = tmp_path / "hf"
    Dataset.from_list(rows).save_to_disk(str(folder))
    _png(folder / "a.png")  # relative image paths resolve against the folder
    loaded = [load_preference_data(p, "text") for p in (tmp_path / "d.jsonl", tmp_path / "d.parquet", folder)]
    for ds in loaded:
        assert len(ds) == 2 and ds[0]["chosen"] == "A red circle."
        assert ds.labels() == [1.0, 0.8]


def test_skip_invalid_counts_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [*_text_rows(tmp_path), {"prompt": "p", "chosen": "", "rejected": "r"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataValidationError, match="1 of 3 rows"):
        load_preference_data(tmp_path / "d.jsonl", "text")
    ds = load_preference_data(tmp_path / "d.jsonl", "text", skip_invalid=True)
    assert len(ds) == 2 and ds.report.total == 3 and len(ds.report.dropped) == 1
    assert "dropped 1 invalid rows" in capsys.readouterr().out


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="preference data not found"):
        load_preference_data(tmp_path / "none.jsonl", "text")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        load_preference_data(tmp_path / "bad.jsonl", "text")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_preference_data(tmp_path / "x.csv", "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_preference_data(tmp_path / "bad.jsonl", "video")


def test_conversational_format_is_accepted(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    kept, report = validate_rows("text", [row])
    assert report.kept == 1
    (tmp_path / "conv.jsonl").write_text(json.dumps(row) + "\n")
    assert len(load_preference_data(tmp_path / "conv.jsonl", "text")) == 1
