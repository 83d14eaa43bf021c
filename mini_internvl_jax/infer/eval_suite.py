"""A folder of benchmark files evaluated in one run, scored beside the published numbers.

`discover` maps each file (or folder of parquet shards) in a data folder to its task by name, as
the releases name them (DocVQA_VAL.tsv, infographicsVQA_val_v1.0_withQT.json,
HallusionBench.tsv, MMBench_DEV_CN.tsv, coco_pope_random.json, a `chartqa/` folder of
parquet shards ...); files no task claims are listed, not guessed at.

`PUBLISHED` holds the numbers of the Mini-InternVL (InternVL2-1B / 2B / 4B) model cards and the
Mini-InternVL paper's main table (OpenGVLab/InternVL `shell/mini_internvl/README.md`), each with
the split it was measured on: DocVQA, InfoVQA and ChartQA were published on their *test* splits
(answers withheld, scored by the benchmark servers) and MMBench on its test split, so a
validation / dev file here measures a neighbouring split; the table says which. MMMU is the
validation split, MathVista testmini, TextVQA val, OCRBench and MME their single split; MME is
published only for 2B (1876.8; the 1B / 4B card values are not confirmed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mini_internvl_jax.config import ModelConfig, load_model_config
from mini_internvl_jax.infer.eval_data import EvalDataError
from mini_internvl_jax.infer.scorers.tasks import TASKS, Task

FORMATS = (".jsonl", ".json", ".tsv", ".parquet")

# task -> names (lowercased, "-"/"_"/" " dropped) a file of that benchmark contains
ALIASES: dict[str, tuple[str, ...]] = {
    "docvqa": ("docvqa",), "infovqa": ("infovqa", "infographicvqa", "infographicsvqa"),
    "textvqa": ("textvqa",), "chartqa": ("chartqa",), "ocrbench": ("ocrbench",),
    "ai2d": ("ai2d",), "seed": ("seedbench",), "mmbench": ("mmbench",), "mmmu": ("mmmu",),
    "mme": ("mme",), "pope": ("pope",), "hallusion": ("hallusion",),
    "mathvista": ("mathvista",),
}

# model -> benchmark key -> (published score in the task's headline unit, split measured on)
PUBLISHED: dict[str, dict[str, tuple[float, str]]] = {
    "mini-internvl-1b": {
        "mmmu": (36.7, "val"), "mathvista": (37.7, "testmini"), "ai2d": (64.1, "test"),
        "chartqa": (72.9, "test"), "docvqa": (81.7, "test"), "infovqa": (50.9, "test"),
        "ocrbench": (754, "test"), "mmbench_en": (65.4, "test"), "mmbench_cn": (60.7, "test"),
        "textvqa": (70.5, "val")},
    "mini-internvl-2b": {
        "mmmu": (36.3, "val"), "mathvista": (46.3, "testmini"), "ai2d": (74.1, "test"),
        "chartqa": (76.2, "test"), "docvqa": (86.9, "test"), "infovqa": (58.9, "test"),
        "ocrbench": (784, "test"), "mmbench_en": (73.2, "test"), "mmbench_cn": (70.9, "test"),
        "textvqa": (73.4, "val"), "mme": (1876.8, "test")},
    "mini-internvl-4b": {
        "mmmu": (48.3, "val"), "mathvista": (58.6, "testmini"), "ai2d": (78.9, "test"),
        "chartqa": (81.5, "test"), "docvqa": (89.2, "test"), "infovqa": (67.0, "test"),
        "ocrbench": (788, "test"), "mmbench_en": (78.6, "test"), "mmbench_cn": (73.9, "test"),
        "textvqa": (74.4, "val")},
}


@dataclass(frozen=True)
class Benchmark:
    task: Task
    path: Path
    key: str  # the published-table key: the task name, or mmbench_en / mmbench_cn


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_ .")


def discover(data_dir: str | Path) -> tuple[list[Benchmark], list[Path]]:
    """(benchmarks found, entries no task claims), in name order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalDataError(f"--data-dir {data_dir} is not a folder")
    found, ignored = [], []
    for p in sorted(data_dir.iterdir()):
        usable = (p.is_file() and p.suffix.lower() in FORMATS) or (
            p.is_dir() and any(p.glob("*.parquet")))
        name = _norm(p.stem if p.is_file() else p.name)
        hits = [t for t, names in ALIASES.items() if usable and any(n in name for n in names)]
        if len(hits) != 1:  # none, or ambiguous
            ignored.append(p)
            continue
        key = hits[0]
        if key == "mmbench":
            key += "_cn" if name.endswith("cn") or "cn" in name.split("mmbench")[-1] else "_en"
        found.append(Benchmark(TASKS[hits[0]], p, key))
    return found, ignored


def published_model(cfg: ModelConfig) -> str | None:
    """Which card model `cfg` has the architecture of (decoder family and shape, ViT shape),
    or None: fine-tuned weights of a card model still compare to its card."""
    def shape(c: ModelConfig):
        return (c.llm.family, c.llm.hidden_size, c.llm.num_layers, c.vision.hidden_size,
                c.vision.num_layers)
    for name in PUBLISHED:
        if shape(load_model_config(name)) == shape(cfg):
            return name
    return None


def suite_rows(results: list[tuple[Benchmark, dict]], model: str | None) -> list[dict]:
    """One row per benchmark: task, file, layout, items, headline metric and score, the
    published number and its split (None where the card gives none), the difference."""
    card = PUBLISHED.get(model or "", {})
    rows = []
    for bench, summary in results:
        score = summary["metrics"][summary["headline"]]
        pub = card.get(bench.key)
        rows.append({"task": bench.task.name, "file": bench.path.name,
                     "layout": summary.get("layout", ""), "items": summary["num_items"],
                     "metric": summary["headline"], "score": score,
                     "published": None if pub is None else pub[0],
                     "published_split": None if pub is None else pub[1],
                     "delta": None if pub is None else score - pub[0]})
    return rows


def format_suite_table(rows: list[dict]) -> str:
    header = ["task", "file", "layout", "items", "metric", "score", "published", "split",
              "delta"]

    def cell(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    table = [header] + [[cell(r[k]) for k in ("task", "file", "layout", "items", "metric",
                                               "score", "published", "published_split",
                                               "delta")] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
