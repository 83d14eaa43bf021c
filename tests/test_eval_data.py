"""Benchmark file readers: JSONL/JSON, VLMEvalKit TSV (base64 images, shared-image index
references, list literals) and HF parquet (image structs), with clear errors; several images
and video rows through to the chat prompt the model is given, and resuming only with the same
media."""

import base64
import json
import sys

import pytest

from mini_internvl_jax.data.processing import prepare_chat_inputs
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.data.video import VideoRef
from mini_internvl_jax.infer.eval_data import (
    EvalDataError,
    MissingImageError,
    as_list,
    image_refs,
    read_rows,
)
from mini_internvl_jax.infer.eval_runner import (
    build_items,
    check_images,
    generate_all,
    load_predictions,
)
from mini_internvl_jax.infer.scorers.tasks import TASKS
from mini_internvl_jax.tools.demo import write_demo
from tests.helpers.eval_assets import png_bytes
from tests.helpers.video import write_video

SHORT = "Answer the question using a single word or phrase."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


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
    with pytest.raises(MissingImageError, match=r"d.json:item 0: field 'image' names image "
                                                r"'im/a.png', which is not at .*--image-root"):
        image_refs(row, tmp_path, where, required=True)
    (tmp_path / "im").mkdir()
    (tmp_path / "im/a.png").write_bytes(png_bytes(0))
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


def test_multi_image_and_video_rows_become_labelled_prompts(tmp_path):
    """Hand-written user turns and tile counts: 2 images share max_num 4 (2 tiles each:
    120x40 is closest to 2x1, 40x90 to 1x2, + thumbnail); video frames are one tile each."""
    (tmp_path / "a.png").write_bytes(png_bytes(0, (120, 40)))
    (tmp_path / "b.png").write_bytes(png_bytes(1, (40, 90)))
    write_video(tmp_path / "clip.mp4", 12)
    write_jsonl(tmp_path / "d.jsonl", [
        {"id": "two", "image": ["a.png", "b.png"], "question": "Same?", "answer": "no"},
        {"id": "vid", "video": "clip.mp4", "num_frames": 3, "question": "Moving?",
         "answer": "yes"},
        {"id": "dflt", "video": "clip.mp4", "question": "Colour?", "answer": "red"},
        {"id": "own", "image": ["a.png", "b.png"], "question": "<image> left, <image> right?",
         "answer": "x"}])
    items = build_items(TASKS["vqa"], tmp_path / "d.jsonl")
    clip = str(tmp_path / "clip.mp4")
    assert [it.images for it in items] == [
        (str(tmp_path / "a.png"), str(tmp_path / "b.png")), (VideoRef(clip, 3),),
        (VideoRef(clip, 8),), (str(tmp_path / "a.png"), str(tmp_path / "b.png"))]
    check_images(items)
    write_demo(tmp_path / "demo", num_stage1=1, num_stage2=1)
    tok = load_tokenizer(tmp_path / "demo" / "tokenizers" / "qwen2")
    frames8 = "".join(f"Frame{k}: <image>\n" for k in range(1, 9))
    expected = [
        ("Image-1: <image>\nImage-2: <image>\nSame? " + SHORT, [3, 3]),
        ("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nMoving? " + SHORT, [1, 1, 1]),
        (frames8 + "Colour? " + SHORT, [1] * 8),
        ("<image> left, <image> right? " + SHORT, [3, 3])]
    for it, (user, tiles) in zip(items, expected, strict=True):
        got = prepare_chat_inputs(it.images, it.prompt, tokenizer=tok, template="Hermes-2",
                                  image_size=448, num_image_tokens=4, max_num=4)
        assert got.prompt.endswith(f"<|im_end|><|im_start|>user\n{user}<|im_end|>"
                                   "<|im_start|>assistant\n"), it.id
        assert got.num_tiles == tiles, it.id


def test_tsv_list_of_base64_images(tmp_path):
    imgs = [base64.b64encode(png_bytes(i)).decode() for i in range(2)]
    path = tmp_path / "m.tsv"
    path.write_text(f"index\tquestion\tanswer\timage\n1\tQ?\ta\t{imgs!r}\n")
    (where, row), = read_rows(path)
    assert image_refs(row, tmp_path, where, required=True) == (png_bytes(0), png_bytes(1))


@pytest.mark.parametrize("task,row,message", [
    ("vqa", {"video": "x.mp4", "num_frames": 0}, "field 'num_frames' must be a positive integer"
     ".*got 0"),
    ("vqa", {"video": "x.mp4", "num_frames": "3x"}, "field 'num_frames' must be a positive"),
    ("vqa", {"video": "x.mp4", "num_frames": True}, "field 'num_frames' must be a positive"),
    ("vqa", {"video": "x.mp4", "image": "a.png"}, "fields 'video' and 'image' are exclusive"),
    ("vqa", {"video": 5}, "field 'video' must be a video path"),
    ("vqa", {"num_frames": 4, "image": "a.png"}, "'num_frames' is given without a 'video'"),
    ("vqa", {"image": []}, "field 'image' is an empty list"),
    ("vqa", {"image": ["a.png", 3]}, r"field 'image\[1\]' must be an image path.*got int"),
    ("vqa", {"image": ["a.png", ""]}, r"field 'image\[1\]' .*got an empty string"),
    ("vqa", {"image": ["a.png", "b.png"], "question": "<image> Q"},
     "holds 1 <image> placeholder\\(s\\) for 2"),
    ("docvqa", {"video": "x.mp4", "answers": ["a"]}, "this task takes images only"),
])
def test_bad_media_fields_name_the_row(task, row, message, tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(0))
    write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "a", **row}])
    with pytest.raises(EvalDataError, match=f"d.jsonl:1: .*{message}"):
        build_items(TASKS[task], tmp_path / "d.jsonl")


def test_tsv_num_frames_cells_and_missing_videos(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text("index\tquestion\tanswer\tvideo\tnum_frames\n1\tQ?\ta\tgone.mp4\t4\n")
    items = build_items(TASKS["vqa"], path)
    assert items[0].images == (VideoRef(str(tmp_path / "gone.mp4"), 4),)
    with pytest.raises(EvalDataError, match="item '1': .*gone.mp4: no such file"):
        check_images(items)


def test_resume_refuses_predictions_made_with_other_frames(tmp_path):
    data = tmp_path / "d.jsonl"
    row = {"id": "v", "video": "clip.mp4", "num_frames": 4, "question": "Q", "answer": "a"}
    write_jsonl(data, [row, {"id": "i", "image": ["x/a.png", "b.png"], "question": "Q",
                             "answer": "a"}])
    for folder in (tmp_path, tmp_path / "elsewhere"):
        (folder / "x").mkdir(parents=True)
        for name in ("x/a.png", "b.png"):
            (folder / name).write_bytes(png_bytes(0))
    task = TASKS["vqa"]
    preds = tmp_path / "r.predictions.jsonl"
    generate_all(task, build_items(task, data), preds, lambda b: ["a"] * len(b), 2)
    recs = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [r["media"] for r in recs] == [["video clip.mp4 x4"], ["a.png", "b.png"]]
    moved = build_items(task, data, image_root=tmp_path / "elsewhere")
    assert load_predictions(preds, task, moved) == {"v": "a", "i": "a"}
    write_jsonl(data, [{**row, "num_frames": 8}])
    with pytest.raises(EvalDataError, match=r"r.predictions.jsonl:1: item 'v' was generated "
                       r"with other images or video frames \(\['video clip.mp4 x4'\]\)"):
        load_predictions(preds, task, build_items(task, data))
