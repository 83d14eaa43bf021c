"""Benchmark file readers: JSONL/JSON, VLMEvalKit TSV (base64 images, shared-image index
references, list literals) and HF parquet (image structs), with clear errors."""

import base64
import json
import sys

import pytest

from mini_internvl_jax.infer.eval_data import EvalDataError, as_list, image_refs, read_rows
from tests.helpers.eval_assets import png_bytes


def test_tsv_base64_images_and_shared_image_references(tmp_path):
    img = base64.b64encode(png_bytes(0)).decode()
    path = tmp_path / "b.tsv"
    path.write_text("index\tquestion\tanswer\timage\n"
                    f"7\tQ1?\t['a', 'b']\t{img}\n"
                    "8\tQ2?\tc\t7\n")  # row 8 shares row 7's image
    rows = read_rows(path)
    assert [w for w, _ in rows] == [f"{path}:2", f"{path}:3"]
    (w1, r1), (w2, r2) = rows
    assert r1["image"] == r2["image"] == png_bytes(0)
    assert as_list(r1["answer"], w1, "answer") == ["a", "b"]
    assert as_list(r2["answer"], w2, "answer") == ["c"]
    assert image_refs(r2, tmp_path, w2, required=True) == (png_bytes(0),)


def test_parquet_image_structs_and_multi_image_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["validation_Art_1"],
        "image_2": [{"bytes": png_bytes(2), "path": None}],
        "image_1": [{"bytes": png_bytes(1), "path": None}],
        "image_3": [None],
        "options": ["['x', 'y']"],
    })
    pq.write_table(table, tmp_path / "part-0.parquet")
    (where, row), = read_rows(tmp_path)  # a folder of shards
    assert image_refs(row, tmp_path, where, required=True) == (png_bytes(1), png_bytes(2))
    assert as_list(row["options"], where, "options") == ["x", "y"]


def test_json_paths_and_errors(tmp_path, monkeypatch):
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"image": "im/a.png"}]}))
    (where, row), = read_rows(tmp_path / "d.json")
    assert image_refs(row, tmp_path, where, required=True) == (str(tmp_path / "im/a.png"),)
    with pytest.raises(EvalDataError, match="no image"):
        image_refs({}, tmp_path, "x:1", required=True)
    with pytest.raises(EvalDataError, match=r"unknown format '\.csv'"):
        (tmp_path / "d.csv").write_text("a,b\n")
        read_rows(tmp_path / "d.csv")
    with pytest.raises(EvalDataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1]\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:2: expected a JSON object"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "bad.tsv").write_text("index\timage\n1\tnot base64!\n")
    with pytest.raises(EvalDataError, match="bad.tsv:2: column 'image' is not base64"):
        read_rows(tmp_path / "bad.tsv")
    with pytest.raises(EvalDataError, match="not a valid literal"):
        as_list("[1, 2", "x:1", "answer")
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were missing
    with pytest.raises(EvalDataError, match="reading parquet needs pyarrow"):
        read_rows(tmp_path / "p.parquet")
