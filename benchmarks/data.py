"""Data-pipeline throughput (stage 2, <= 6 tiles + thumbnail at 448 px).

    JAX_PLATFORMS=cpu python benchmarks/data.py [--samples 300] [--json out.json]

Generates ~300 InternVL-format samples (JPEGs of 300-2000 px in assorted aspect ratios;
60% one image, 25% two images, 15% text-only; 1-3 rounds of 10-80 words), then times two
epochs through `build_train_iterator` in one process (1 thread, N threads) and with worker
processes, plus a reference-style loop that does what InternVL's PyTorch dataset does
(PIL tiles, per-tile tensor normalisation, tokenizing the expanded `<IMG_CONTEXT>` string).
Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mini_internvl_jax.data import DataConfig, build_train_iterator, load_tokenizer  # noqa: E402
from mini_internvl_jax.data.templates import get_template, render  # noqa: E402
from mini_internvl_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD, choose_grid  # noqa: E402
from mini_internvl_jax.tools.demo import write_demo  # noqa: E402

WORDS = ("the a chart shows bar line value year growth image left right top bottom red blue "
         "green number total count percent market data region city model answer question "
         "describe explain compare higher lower between during first second third shape "
         "colour large small increase decrease average table figure").split()
RATIOS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 3.0, 1 / 3, 1.5)


def _photo(rng, w: int, h: int) -> bytes:
    """JPEG with smooth colour fields, flat shapes and mild noise (photo/chart-like)."""
    coarse = rng.integers(0, 255, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle([x0, y0, x0 + int(rng.integers(10, w // 3 + 11)),
                     y0 + int(rng.integers(10, h // 3 + 11))],
                    fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    arr = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _words(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(10, 81))))


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, k = [], 0
    for i in range(n):
        u = rng.random()
        n_img = 1 if u < 0.60 else 2 if u < 0.85 else 0
        names = []
        for _ in range(n_img):
            long_side = int(rng.integers(300, 2001))
            r = RATIOS[int(rng.integers(len(RATIOS)))]
            w, h = (long_side, max(16, int(long_side / r))) if r >= 1 else (
                max(16, int(long_side * r)), long_side)
            name = f"{k:04d}.jpg"
            (folder / "images" / name).write_bytes(_photo(rng, w, h))
            names.append(name)
            k += 1
        conv = []
        for r in range(int(rng.integers(1, 4))):
            q = _words(rng) + "?"
            if r == 0 and names:
                q = "".join(f"Image-{j + 1}: <image>\n" for j in range(len(names))) + q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _words(rng) + "."}]
        item = {"id": i, "conversations": conv}
        if names:
            item["image"] = names[0] if len(names) == 1 else names
        lines.append(json.dumps(item))
    (folder / "bench.jsonl").write_text("\n".join(lines) + "\n")
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"bench": {"root": "images", "annotation": "bench.jsonl",
                                          "repeat_time": 1, "data_augment": False}}))
    return meta


def run_pipeline(meta: Path, tokenizer_dir: str, *, threads: int, workers: int, epochs: int,
                 seq_len: int, batch_size: int, max_tiles: int) -> dict:
    cfg = DataConfig(meta_path=str(meta), template="Hermes-2", max_dynamic_patch=6,
                     num_epochs=epochs, num_threads=threads, num_workers=workers,
                     prefetch_buffer_size=max(4, 4 * threads))
    t0, c0 = time.perf_counter(), _cpu_seconds()
    it = build_train_iterator(cfg, tokenizer=load_tokenizer(tokenizer_dir),
                              num_image_tokens=256, image_size=448, seq_len=seq_len,
                              batch_size=batch_size, max_tiles=max_tiles, seed=0,
                              shard_index=0, shard_count=1)
    first = None
    samples = tiles = batches = 0
    for batch in it:
        if first is None:
            first = (time.perf_counter(), int(batch["stats_num_samples"]))
        samples += int(batch["stats_num_samples"])
        tiles += int(batch["image_flags"].sum())
        batches += 1
    t1 = time.perf_counter()
    it.close()
    cpu = _cpu_seconds() - c0
    steady = (samples - first[1]) / (t1 - first[0])
    return dict(samples=samples, batches=batches, tiles=tiles, seconds=t1 - t0,
                samples_per_s=samples / (t1 - t0), steady_samples_per_s=steady,
                startup_s=first[0] - t0, cpu_ms_per_sample=1e3 * cpu / samples)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_reference_style(meta: Path, tokenizer_dir: str) -> dict:
    """What InternVL's LazySupervisedDataset spends per sample, minus file-system quirks."""
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(1)  # as in a DataLoader worker
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tmpl = get_template("Hermes-2")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    folder = meta.parent
    items = [json.loads(x) for x in (folder / "bench.jsonl").read_text().splitlines()]
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for item in items:
        names = item.get("image", [])
        names = [names] if isinstance(names, str) else names
        counts, tensors = [], []
        for name in names:
            image = Image.open(folder / "images" / name).convert("RGB")
            max_num = max(1, 6 // len(names))
            cols, rows = choose_grid(*image.size, max_num=max_num)
            resized = image.resize((448 * cols, 448 * rows))
            tiles = [resized.crop(((k % cols) * 448, (k // cols) * 448, (k % cols + 1) * 448,
                                   (k // cols + 1) * 448)) for k in range(cols * rows)]
            if len(tiles) > 1:
                tiles.append(image.resize((448, 448)))
            for t in tiles:
                x = torch.from_numpy(np.array(t)).permute(2, 0, 1).contiguous().float().div(255)
                tensors.append(x.sub_(mean).div_(std))
            counts.append(256 * len(tiles))
        msgs = [("human" if c["from"] == "human" else "gpt", c["value"])
                for c in item["conversations"]]
        text = render(tmpl, msgs, image_token_counts=counts)
        tok.encode(text)
        if tensors:
            torch.stack(tensors)
    dt = time.perf_counter() - t0
    return dict(samples=len(items), seconds=dt, samples_per_s=len(items) / dt,
                cpu_ms_per_sample=1e3 * (_cpu_seconds() - c0) / len(items))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2, help="passes per pipeline mode")
    p.add_argument("--data-dir", help="reuse/keep the generated data here")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-tiles", type=int, default=32)
    p.add_argument("--modes", default="1t,nt,w1,w2,ref",
                   help="comma list: 1t (1 thread), nt (N threads), w1/w2 (workers x 1/2 "
                        "threads), ref (reference-style loop)")
    p.add_argument("--json", default="data_benchmark.json")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.data_dir or tmp.name)
    meta = folder / "meta.json"
    t = time.perf_counter()
    if not meta.exists():
        meta = make_dataset(folder, args.samples)
    if not (folder / "demo" / "tokenizers").exists():
        write_demo(folder / "demo", num_stage1=8, num_stage2=8, force=True)
    gen_s = time.perf_counter() - t
    tok_dir = str(folder / "demo" / "tokenizers" / "qwen2")
    geom = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tiles=args.max_tiles)

    modes = args.modes.split(",")
    rows = []
    for key, label, threads, workers in (
            ("1t", "1 process, 1 thread", 0, 0),
            ("nt", f"1 process, {args.threads} threads", args.threads, 0),
            ("w1", f"{args.workers} workers x 1 thread", 0, args.workers),
            ("w2", f"{args.workers} workers x 2 threads", 2, args.workers)):
        if key in modes:
            r = run_pipeline(meta, tok_dir, threads=threads, workers=workers,
                             epochs=args.epochs, **geom)
            rows.append(dict(mode=label, threads=threads, workers=workers, **r))
    if "ref" in modes:
        rows.append(dict(mode="reference-style loop (1 thread)", threads=0, workers=0,
                         **run_reference_style(meta, tok_dir)))

    print(f"\nstage-2 data pipeline, {args.samples} samples x {args.epochs} epochs, "
          "max_dynamic_patch 6 + thumbnail, "
          f"448 px, seq_len {args.seq_len}, batch {args.batch_size}, tile buffer "
          f"{args.max_tiles}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':36s} {'samples/s':>10s} {'steady/s':>9s} {'startup s':>10s} "
          f"{'CPU ms/sample':>14s}")
    for r in rows:
        print(f"{r['mode']:36s} {r['samples_per_s']:10.1f} "
              f"{r.get('steady_samples_per_s', float('nan')):9.1f} "
              f"{r.get('startup_s', float('nan')):10.2f} {r['cpu_ms_per_sample']:14.1f}")
    out = dict(samples=args.samples, data_generation_s=gen_s, cpus=os.cpu_count(),
               load_average=os.getloadavg(),
               python=sys.version.split()[0], machine=platform.machine(), geometry=geom,
               results=rows)
    path = Path(args.json)
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(out, indent=1))
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
