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


def test_hf_image_stored_by_path_is_read_from_its_path(tmp_path: Path) -> None:
    """``datasets`` writes path-backed images to Parquet as {"bytes": None, "path": ...}: not empty bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _png(tmp_path / "a.png")
    by_path = {"bytes": None, "path": "a.png"}
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "images": [by_path]},
            {"prompt": "p", "chosen": "c", "rejected": "r", "images": [{"bytes": None, "path": "gone.png"}]},
            {"prompt": "p", "chosen": "c", "rejected": "r", "images": [{"bytes": None, "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_preference_data(tmp_path / "d.parquet", "text", skip_invalid=True)
    assert len(ds) == 1 and ds[0]["images"] == [by_path]
    reasons = dict(ds.report.dropped)
    assert f"unreadable image 'images[0]' at {tmp_path / 'gone.png'}" in reasons[1]
    assert "image 'images[0]' holds neither bytes nor a path" in reasons[2]
    png = (tmp_path / "a.png").read_bytes()
    pair = {"caption": "c", "chosen_image": by_path, "rejected_image": {"bytes": png, "path": "ignored.png"}}
    assert validate_rows("image", [pair], base_dir=tmp_path)[1].kept == 1


def test_image_pair_sizes_compare_height_and_width_in_any_format(tmp_path: Path) -> None:
    """Paths, PIL images, (H, W), (H, W, C) and (C, H, W) arrays of one 6x10 image all match; sizes still differ."""
    from PIL import Image

    path = str(_png(tmp_path / "c.png", (10, 6)))  # PIL sizes are (width, height)
    same = [path, Image.new("L", (10, 6)), np.zeros((6, 10)), np.zeros((6, 10, 3)), np.zeros((3, 6, 10)),
            np.zeros((1, 6, 10)), np.zeros((6, 10, 4)), {"bytes": None, "path": "c.png"}]
    rows = [{"caption": "x", "chosen_image": a, "rejected_image": b} for a in same for b in same]
    assert validate_rows("image", rows, base_dir=tmp_path)[1].kept == len(rows)
    # (3, 4, 3) reads as HWC (3, 4) or CHW (4, 3): either may be the other image's layout, so no false error
    ambiguous = {"caption": "x", "chosen_image": np.zeros((3, 4, 3)), "rejected_image": np.zeros((3, 3, 4))}
    assert validate_rows("image", [ambiguous])[1].kept == 1
    bad = [{"caption": "x", "chosen_image": path, "rejected_image": np.zeros((10, 6, 3))},
           {"caption": "x", "chosen_image": np.zeros((3, 6, 10)), "rejected_image": np.zeros((3, 10, 6))},
           {"caption": "x", "chosen_image": np.zeros((3, 4, 3)), "rejected_image": np.zeros((5, 5))}]
    with pytest.raises(DataValidationError) as err:
        validate_rows("image", bad, base_dir=tmp_path)
    reasons = dict(err.value.problems)
    assert "chosen_image size (6, 10) differs from rejected_image size (10, 6) (height, width)" in reasons[0]
    assert "chosen_image size (6, 10) differs from rejected_image size (10, 6)" in reasons[1]
    assert "chosen_image size (3, 4) or (4, 3) differs from rejected_image size (5, 5)" in reasons[2]


def test_jsonl_lines_end_at_newline_only(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 may stand raw in JSON strings; CRLF files load; error line numbers stay right."""
    rows = [{"prompt": f"a{sep}b", "chosen": "c", "rejected": "r"} for sep in ("\u2028", "\u2029", "\x85")]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    (tmp_path / "d.jsonl").write_bytes(text.encode("utf-8"))
    ds = load_preference_data(tmp_path / "d.jsonl", "text")
    assert [r["prompt"] for r in ds.rows] == ["a\u2028b", "a\u2029b", "a\x85b"]
    (tmp_path / "bad.jsonl").write_bytes((text + "\r\n{not json\r\n").encode("utf-8"))
    with pytest.raises(ValueError, match=r"bad.jsonl:5 is not valid JSON"):
        load_preference_data(tmp_path / "bad.jsonl", "text")


def test_truncated_json_array_names_the_file_and_position(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[{"prompt": "p", "chosen": "c", "rejected": "r"},\n')
    with pytest.raises(ValueError, match=r"d\.json:2:1 is not a valid JSON array \(Expecting value; the file may "
                                         r"be truncated\)"):
        load_preference_data(tmp_path / "d.json", "text")
    (tmp_path / "ok.json").write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}], indent=1))
    assert len(load_preference_data(tmp_path / "ok.json", "text")) == 1


@pytest.mark.parametrize("content", [None, "", "  \n", [], [{"type": "text", "text": "  "}],
                                     [{"type": "text", "text": None}, {"type": "text", "text": ""}]],
                         ids=["none", "empty", "blank", "no-parts", "blank-part", "empty-parts"])
def test_conversational_response_without_content_is_empty(content) -> None:
    """Content None once read as the text "None"; content parts as the non-empty repr of the list."""
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    rows = [good, {**good, "rejected": [{"role": "assistant", "content": content}]},
            {**good, "chosen": [{"role": "assistant"}]}]
    with pytest.raises(DataValidationError) as err:
        validate_rows("text", rows)
    assert err.value.problems == [(1, "empty response in 'rejected'"), (2, "empty response in 'chosen'")]


def test_conversational_response_with_text_or_an_image_part_is_not_empty() -> None:
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": [{"type": "text", "text": " A cat."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "image"}]}]},
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": [{"text": "A dog."}]}],
             "rejected": [{"role": "assistant", "content": None}, {"role": "assistant", "content": "No."}]}]
    for row in rows:  # one image per {"type": "image"} part of the prompt
        row["images"] = [np.zeros((4, 4, 3))]
    assert validate_rows("text", rows)[1].kept == 2


@pytest.mark.parametrize(("label", "shown"), [("0.7", "'0.7' (str)"), (True, "True (a bool, not a probability"),
                                              (False, "False (a bool"), (np.bool_(True), "np.True_ (a bool"),
                                              ([0.5], "[0.5] (list)")])
def test_label_must_be_a_number(label, shown: str) -> None:
    """float() accepted "0.7" and True as labels; neither is a probability."""
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [{**good, "label": 0.7}, {**good, "label": 1}, {**good, "label": np.float32(0.25)},
            {**good, "label": label}]
    with pytest.raises(DataValidationError) as err:
        validate_rows("text", rows)
    assert len(err.value.problems) == 1 and err.value.problems[0][0] == 3
    assert err.value.problems[0][1].startswith(f"label must be a number in [0, 1], got {shown}")
    kept, report = validate_rows("text", rows, skip_invalid=True)
    assert report.kept == 3 and "dropped 1 invalid rows" in report.summary()


def test_video_frames_are_checked_like_images(tmp_path: Path) -> None:
    frame = _png(tmp_path / "f.png").name
    good = {"prompt": "What happens?", "chosen": "It rolls.", "rejected": "Nothing."}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    rows = [
        {**good, "videos": [[frame, frame], np.zeros((4, 8, 8, 3))]},
        {**good, "videos": [[frame, "missing.png"]]},
        {**good, "videos": [[]]},
        {**good, "videos": [[frame, str(broken)], np.zeros((0, 8, 8, 3))]},
        {**good, "videos": [[frame, np.full((8, 8), np.nan)]]},
        {**good, "videos": [np.zeros((8, 8))]},
        {**good, "videos": [frame]},
        {**good, "videos": [[frame, None]]},
        {**good, "videos": np.ones((2, 8, 8)), "images": None},
        {**good, "videos": []},  # no videos, like images=[]
    ]
    with pytest.raises(DataValidationError) as err:
        validate_rows("text", rows, base_dir=tmp_path)
    reasons: dict[int, list[str]] = {}
    for i, why in err.value.problems:
        reasons.setdefault(i, []).append(why)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert reasons[1] == [f"unreadable image 'videos[0][1]' at {tmp_path / 'missing.png'} (FileNotFoundError)"]
    assert reasons[2] == ["video 'videos[0]' has no frames"]
    assert reasons[3][0].startswith(f"unreadable image 'videos[0][1]' at {broken}")
    assert reasons[3][1] == "video 'videos[1]' has no frames"
    assert reasons[4] == ["image 'videos[0][1]' contains NaN or inf"]
    assert reasons[5] == ["video 'videos[0]' has shape (8, 8), expected (T, H, W) or (T, H, W, C)/(T, C, H, W)"]
    assert reasons[6] == ["video 'videos[0]' must be a list of frames or a (T, H, W[, C]) array, got str"]
    assert reasons[7] == ["missing field 'videos[0][1]'"]
    assert "row 1:" in str(err.value) and "7 of 10 rows" in str(err.value)
    kept, report = validate_rows("text", rows, base_dir=tmp_path, skip_invalid=True)
    assert report.kept == 3 and "dropped 7 invalid rows" in report.summary()


def test_videos_load_from_jsonl_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = _png(tmp_path / "f.png").name
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "videos": [[frame, frame]]},
            {"prompt": "p", "chosen": "c", "rejected": "r", "videos": [[frame, "gone.png"]]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        ds = load_preference_data(tmp_path / name, "text", skip_invalid=True)
        assert len(ds) == 1 and [i for i, _ in ds.report.dropped] == [1]
