"""The package's import graph, read from the source with `ast` (nothing is imported): no cycles,
no import from a higher layer, and function-local imports only where they keep an optional or
heavy dependency lazy. The layer table is the one in docs/architecture.md."""

import ast
from pathlib import Path

import pytest

PACKAGE = "mini_internvl_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# `configs` holds no code, only the YAML presets `configlib.read_preset` reads as package data.
CORE = {"config", "configlib", "fileio", "errors", "batch", "sharding", "configs"}
# group -> the groups it may import (its own included)
ALLOWED = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "models": {"core", "kernels", "models"},
    "data": {"core", "data"},
    "convert": {"core", "kernels", "models", "data", "convert"},
    "checkpoints": {"core", "kernels", "models", "data", "convert", "checkpoints"},
    "train": {"core", "kernels", "models", "data", "convert", "checkpoints", "train"},
    "infer": {"core", "kernels", "models", "data", "convert", "checkpoints", "infer"},
    "api": {"core", "kernels", "models", "data", "convert", "checkpoints", "train",
            "infer"},  # __init__.py
    "cli": {"core", "kernels", "models", "data", "convert", "checkpoints", "train", "infer",
            "cli"},
}
# Third-party modules a function may import itself, and why.
LAZY_THIRD_PARTY = {
    "torch": "optional: only pytorch_model.bin checkpoints need it (seconds to import)",
    "grain": "its import starts worker machinery; only runs that read files need it",
    "wandb": "optional logging backend",
    "av": "loads the FFmpeg libraries (0.1 s warm, 0.5 s cold, measured); only video rows "
          "and --video need it",
    "tensorflow_datasets": "optional record source; imports TensorFlow-sized machinery",
    "array_record": "optional record format",
    "tensorboardX": "imports torch whenever torch is installed (seconds at start-up)",
    "sentencepiece": "only SentencePiece tokenizers need it",
    "tokenizers": "only Hugging Face tokenizers need it",
    "jax.experimental.topologies": "TPU AOT compile only; needs libtpu",
    "pyarrow": "only parquet benchmark files need it (evaluation); a clear error if missing",
}
# Package imports a function may make itself, and why.
LAZY_PACKAGE = {
    (PACKAGE, f"{PACKAGE}.checkpoints.resolve"): "`import mini_internvl_jax` stays free of jax",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def group(module: str) -> str:
    if module == PACKAGE:
        return "api"
    first = module.split(".")[1]
    if first in CORE:
        return "core"
    if first in ALLOWED:
        return first
    raise AssertionError(f"{module} is in no layer: add it to the table in {__file__} and "
                         "docs/architecture.md")


def _resolve(name: str) -> str:
    """The package module an import names (`pkg.mod.Class` -> `pkg.mod`)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, inside a function, line) for every import in the package."""
    out = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                out.append((mod, name, id(node) in local, node.lineno))
    return out


IMPORTS = imports()


def package_edges() -> set[tuple[str, str]]:
    """Import edges between package modules. Importing the root package itself adds no edge:
    Python runs it before any submodule anyway (test_root_package_stays_light keeps it cheap)."""
    return {(a, _resolve(b)) for a, b, _, _ in IMPORTS
            if b.split(".")[0] == PACKAGE and _resolve(b) not in (a, PACKAGE)}


def test_root_package_stays_light():
    eager = {_resolve(b) for a, b, local, _ in IMPORTS
             if a == PACKAGE and not local and b.split(".")[0] == PACKAGE}
    assert {group(m) for m in eager} <= {"core"}, eager


def test_every_module_has_a_layer():
    for mod in MODULES:
        group(mod)


def test_no_upward_imports():
    bad = sorted(f"{a} ({group(a)}) imports {b} ({group(b)})" for a, b in package_edges()
                 if group(b) not in ALLOWED[group(a)])
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_only_keep_heavy_dependencies_lazy():
    bad = []
    for a, b, local, line in IMPORTS:
        if not local:
            continue
        if b.split(".")[0] == PACKAGE:
            if (a, _resolve(b)) not in LAZY_PACKAGE:
                bad.append(f"{a}:{line} imports {b} inside a function")
        elif not any(b == m or b.startswith(m + ".") for m in LAZY_THIRD_PARTY):
            bad.append(f"{a}:{line} imports {b} inside a function (not a heavy optional "
                       "dependency; import it at the top)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("import mini_internvl_jax.models.llm", f"{PACKAGE}.models.llm"),
    ("from mini_internvl_jax.models import InternVLModel", f"{PACKAGE}.models"),
    ("from mini_internvl_jax import configlib", f"{PACKAGE}.configlib"),
])
def test_resolve_names_the_module(source, expected):
    node = ast.parse(source).body[0]
    name = (node.names[0].name if isinstance(node, ast.Import)
            else f"{node.module}.{node.names[0].name}")
    assert _resolve(name) == expected
