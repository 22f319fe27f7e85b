"""Sources (JSONL, Parquet with paths or bytes, datasets folders, Hub layout), column mapping, path confinement."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmalign.data import (DataValidationError, LazyImage, PathEscapeError, decode_image, is_hub_id,
                          load_preference_data, map_columns, parse_columns, resolve_media_path)


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


COLORS = [(200, 10, 10), (10, 200, 10)]
CONV_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def _rows(fmt: str, images: list) -> list[dict]:
    rows = []
    for k, (img, ans) in enumerate(zip(images, ["red", "green"])):
        if fmt == "standard":
            rows.append({"prompt": "What colour?", "chosen": ans, "rejected": "blue", "images": [img],
                         "label": [1.0, 0.3][k]})
        else:
            rows.append({"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": ans}],
                         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
                         "images": [img], "label": [1.0, 0.3][k]})
    return rows


def _write(source: str, fmt: str, folder: Path) -> Path:
    """The same two pairs written as ``source``; returns what to pass to load_preference_data."""
    folder.mkdir(parents=True)
    for k, c in enumerate(COLORS):
        (folder / f"img{k}.png").write_bytes(_png_bytes(c))
    by_path = _rows(fmt, [f"img{k}.png" for k in range(2)])
    by_bytes = _rows(fmt, [{"bytes": _png_bytes(c), "path": None} for c in COLORS])
    if source == "jsonl":
        path = folder / "pairs.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in by_path))
        return path
    if source in ("parquet_paths", "parquet_bytes"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(by_path if source == "parquet_paths" else by_bytes), path)
        return path
    from datasets import Dataset, Features, Image, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    if fmt == "conversational":  # Arrow needs one type per column: content parts as structs throughout
        part = List({"type": Value("string"), "text": Value("string")})
        msg = List({"role": Value("string"), "content": part})
        for r in by_bytes:
            r["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"][0]["content"]}]}]
    feats = Features({"prompt": Value("string") if fmt == "standard" else msg,
                      "chosen": Value("string") if fmt == "standard" else msg,
                      "rejected": Value("string") if fmt == "standard" else msg,
                      "images": List(Image()), "label": Value("float64")})
    ds = Dataset.from_list(by_bytes, features=feats)
    if source == "datasets_folder":
        ds.save_to_disk(str(folder / "ds"))
        return folder / "ds"
    (folder / "hub" / "data").mkdir(parents=True)  # a local copy of a Hub data set repository
    ds.to_parquet(str(folder / "hub" / "data" / "train-00000-of-00001.parquet"))
    return folder / "hub"


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return " ".join(p["text"] if isinstance(p, dict) else p for m in value
                    for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                    if not isinstance(p, dict) or p.get("type") == "text")


SOURCES = ["jsonl", "parquet_paths", "parquet_bytes", "datasets_folder", "hub_layout"]


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("source", SOURCES)
def test_every_format_and_source_loads_the_same_pairs(tmp_path: Path, source: str, fmt: str) -> None:
    data = load_preference_data(_write(source, fmt, tmp_path / "d"), "text")
    assert len(data) == 2 and data.labels() == [1.0, 0.3]
    for row, color, ans in zip(data.rows, COLORS, ["red", "green"]):
        assert _text(row["chosen"]) == ans and _text(row["rejected"]) == "blue"
        assert "What colour?" in _text(row["prompt"])
        img = row["images"][0]
        assert not hasattr(img, "mode")  # still encoded (bytes or a path), never a decoded PIL image
        pixels = np.asarray(LazyImage(img, data.base_dir).load())
        assert pixels.shape == (4, 6, 3) and tuple(pixels[0, 0]) == color


def test_column_mapping_rlaif_v_style(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png_bytes(COLORS[0]))
    rows = [{"image": "a.png", "question": "Colour?", "chosen": "red", "rejected": "blue", "ds_name": "x"}]
    (tmp_path / "rlaif.jsonl").write_text(json.dumps(rows[0]))
    data = load_preference_data(tmp_path / "rlaif.jsonl", "text", columns="prompt=question,images=image")
    assert data.rows[0]["prompt"] == "Colour?" and data.rows[0]["images"] == ["a.png"]
    assert "question" not in data.rows[0] and data.rows[0]["ds_name"] == "x"
    assert parse_columns({"prompt": "question"}) == {"prompt": "question"}
    with pytest.raises(ValueError, match=r"'query' \(columns.prompt\) not found.*columns \['chosen'"):
        map_columns([{"chosen": "c"}], {"prompt": "query"})
    with pytest.raises(ValueError, match="expected=column"):
        parse_columns("prompt")
    with pytest.raises(DataValidationError, match="row 0: missing field 'prompt'"):
        load_preference_data(tmp_path / "rlaif.jsonl", "text")  # unmapped: the column is 'question'


def test_paths_may_not_escape_the_data_folder(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes(COLORS[0]))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ok.png").write_bytes(_png_bytes(COLORS[1]))
    (data_dir / "link.png").symlink_to(outside)
    for bad, how in (("../secret.png", "'..' path"), (str(outside), "absolute path"), ("link.png", "a link")):
        with pytest.raises(PathEscapeError, match=how):
            resolve_media_path(bad, data_dir)
        rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "images": [bad]}]
        (data_dir / "pairs.jsonl").write_text(json.dumps(rows[0]))
        with pytest.raises(DataValidationError, match="row 0: 'images\\[0\\]': image path .* outside the data folder"):
            load_preference_data(data_dir / "pairs.jsonl", "text")
        allowed = load_preference_data(data_dir / "pairs.jsonl", "text", allow_outside=True)
        assert tuple(np.asarray(LazyImage(bad, data_dir, allow_outside=True).load())[0, 0]) == COLORS[0]
        assert len(allowed) == 1
    assert resolve_media_path(str(data_dir / "ok.png"), data_dir) == data_dir / "ok.png"  # absolute, but inside
    with pytest.raises(PathEscapeError):
        LazyImage("../secret.png", data_dir).load()  # decoding confines too, not only validation


@pytest.mark.parametrize(("row", "reason"), [
    ({"prompt": [{"role": "bot", "content": "hi"}], "chosen": "c", "rejected": "r"},
     "prompt[0] has unknown role 'bot' (expected one of system, user, assistant)"),
    ({"prompt": CONV_PROMPT, "chosen": "c", "rejected": "r"},
     "the prompt has 1 {\"type\": \"image\"} parts but 'images' holds 0 image(s)"),
    ({"prompt": "<image> <image> what?", "chosen": "c", "rejected": "r", "images": ["a.png"]},
     "the prompt has 2 '<image>' placeholders but 'images' holds 1 image(s)"),
    ({"prompt": "what?", "chosen": "c", "rejected": "\t ", "images": ["a.png"]}, "empty response in 'rejected'"),
    ({"prompt": "what?", "chosen": "c", "rejected": "r", "images": ["a.png"], "rejected_images": ["a.png"] * 2},
     "'rejected_images' holds 2 image(s), 'images' holds 1"),
    ({"prompt": "what?", "chosen": "c", "rejected": "r", "images": ["corrupt.png"]},
     "unreadable image 'images[0]'"),
])
def test_bad_rows_name_the_row_and_the_reason(tmp_path: Path, row: dict, reason: str) -> None:
    (tmp_path / "a.png").write_bytes(_png_bytes(COLORS[0]))
    (tmp_path / "corrupt.png").write_bytes(_png_bytes(COLORS[0])[:30])
    good = {"prompt": "what?", "chosen": "c", "rejected": "r", "images": ["a.png"]}
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in (good, row)))
    with pytest.raises(DataValidationError) as err:
        load_preference_data(tmp_path / "pairs.jsonl", "text", image_token="<image>")
    assert err.value.problems[0][0] == 1 and reason in err.value.problems[0][1], err.value.problems
    kept = load_preference_data(tmp_path / "pairs.jsonl", "text", image_token="<image>", skip_invalid=True)
    assert len(kept) == 1 and kept.report.dropped[0][0] == 1 and kept.row_number(0) == 0


def test_hub_ids_and_local_paths_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("openbmb/RLAIF-V-Dataset") and is_hub_id("pairs")
    assert not is_hub_id("pairs.jsonl") and not is_hub_id("./x") and not is_hub_id(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="neither a local file or folder nor a loadable Hub data set "
                                                "\\(HF_HUB_OFFLINE is set"):
        load_preference_data("nobody-xyz/not-a-dataset", "text")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_preference_data(tmp_path / "missing.jsonl", "text")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_decode_image_passes_decoded_values_through() -> None:
    arr = np.zeros((3, 3, 3), dtype=np.uint8)
    assert decode_image(arr) is arr
    assert decode_image({"bytes": _png_bytes(COLORS[0]), "path": None}).mode == "RGB"


def test_prompt_rows_for_generation_and_evaluation(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png_bytes(COLORS[0]))
    rows = [{"image": "a.png", "question": "Is there a cat?", "answer": "yes"},
            {"image": "../a.png", "question": "Is there a dog?", "answer": "no"},
            {"image": "a.png", "question": "  ", "answer": "no"}]
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataValidationError) as err:
        load_preference_data(tmp_path / "pope.jsonl", "prompt", columns={"prompt": "question", "images": "image"})
    assert [i for i, _ in err.value.problems] == [1, 2] and err.value.problems[1][1] == "empty prompt"
    kept = load_preference_data(tmp_path / "pope.jsonl", "prompt", columns={"prompt": "question", "images": "image"},
                                skip_invalid=True)
    assert len(kept) == 1 and kept.rows[0]["answer"] == "yes" and kept.rows[0]["images"] == ["a.png"]


def _hub_repo(root: Path, rows: list[dict], images: dict[str, bytes]) -> Path:
    """A data set repository as the Hub cache lays it out: snapshots/<commit>/<file> links into blobs/."""
    repo = root / "datasets--me--prefs"
    snap = repo / "snapshots" / "c0ffee"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    files = {"data/train.jsonl": "\n".join(json.dumps(r) for r in rows).encode(), **images}
    for i, (name, content) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, (snap / name).parent))
    return snap


@pytest.mark.parametrize("source", ["hub_id", "hub_layout_folder"])
def test_hub_data_set_image_paths_are_confined_to_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             source: str) -> None:
    """A Hub data set whose image column holds paths: they resolve against its local folder (the snapshot in the
    Hub cache for a Hub id, the folder itself for a local copy) and may not leave it unless allow_outside."""
    import huggingface_hub.constants

    from mmalign.data import loaders

    secret = tmp_path / "secret.png"
    secret.write_bytes(_png_bytes(COLORS[0]))
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "images": ["images/a.png"]},
            {"prompt": "p", "chosen": "c", "rejected": "r", "images": ["../../../../secret.png"]},
            {"prompt": "p", "chosen": "c", "rejected": "r", "images": [str(secret)]}]
    cache = tmp_path / "hub"
    snap = _hub_repo(cache, rows, {"images/a.png": _png_bytes(COLORS[1])})
    if source == "hub_id":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        # what datasets.load_dataset returns for it (offline tests cannot ask the Hub): the snapshot's rows
        monkeypatch.setattr(loaders, "_load_dataset", lambda name, split: loaders.read_rows(snap / "data/train.jsonl"))
        name: str | Path = "me/prefs"
        assert loaders.hub_folder("me/prefs") == snap
    else:
        name = snap
    with pytest.raises(DataValidationError) as err:
        load_preference_data(name, "text")
    assert [i for i, _ in err.value.problems] == [1, 2]
    assert all("outside the data folder" in why for _, why in err.value.problems)
    kept = load_preference_data(name, "text", skip_invalid=True)
    assert len(kept) == 1 and kept.base_dir == snap
    assert tuple(np.asarray(LazyImage(kept.rows[0]["images"][0], kept.base_dir).load())[0, 0]) == COLORS[1]
    everything = load_preference_data(name, "text", allow_outside=True)
    assert len(everything) == 3 and tuple(np.asarray(LazyImage(
        everything.rows[2]["images"][0], everything.base_dir, allow_outside=True).load())[0, 0]) == COLORS[0]


def test_a_hub_data_set_without_a_local_snapshot_refuses_every_path(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from mmalign.data import loaders

    (tmp_path / "a.png").write_bytes(_png_bytes(COLORS[0]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(loaders, "_load_dataset", lambda name, split: [
        {"prompt": "p", "chosen": "c", "rejected": "r", "images": [str(tmp_path / "a.png")]}])
    with pytest.raises(DataValidationError, match="row 0: .*outside the data folder"):
        load_preference_data("me/prefs", "text")


@pytest.mark.parametrize("source", ["parquet_bytes", "datasets_folder", "hub_layout"])
def test_embedded_image_bytes_are_held_on_disk_not_in_the_rows(tmp_path: Path, source: str) -> None:
    """Rows of sources with embedded images hold references to a spill file; the bytes read back are the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mmalign.data.spill import SpilledBytes

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())  # noise: a few KB each, over the spill threshold
    rows = [{"prompt": "What colour?", "chosen": "red", "rejected": "blue", "images": [{"bytes": b, "path": None}]}
            for b in blobs]
    tmp_path.mkdir(exist_ok=True)
    if source == "parquet_bytes":
        name: Path = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), name)
    else:
        from datasets import Dataset, Features, Image as HFImage, List, Value

        feats = Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
                          "images": List(HFImage())})
        ds = Dataset.from_list(rows, features=feats)
        if source == "datasets_folder":
            name = tmp_path / "ds"
            ds.save_to_disk(str(name))
        else:
            name = tmp_path / "hub"
            (name / "data").mkdir(parents=True)
            ds.to_parquet(str(name / "data" / "train.parquet"))
    data = load_preference_data(name, "text")
    held = [r["images"][0]["bytes"] for r in data.rows]
    assert all(isinstance(h, SpilledBytes) for h in held)
    assert [bytes(h) for h in held] == blobs and held[0].store is held[2].store
    for r, b in zip(data.rows, blobs):
        assert np.array_equal(np.asarray(LazyImage(r["images"][0], data.base_dir).load()),
                              np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))


def test_spilled_bytes_reach_spawned_workers_through_the_descriptor() -> None:
    """Workers started by spawn or forkserver (Python 3.14's default on Linux) get the data set pickled: a spilled
    reference travels as a duplicate of the file's descriptor and reads the same bytes there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mmalign.data.spill import SpillFile

    store = SpillFile()
    blobs = [bytes(range(256)) * 8, b"x" * 5000]
    refs = [store.add(b) for b in blobs]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(bytes, refs)) == blobs
