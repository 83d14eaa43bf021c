"""The package's import graph, read from the source with `ast` (nothing is imported): no cycles,
no import from a higher layer (imports of the root package's own names and module names given to
`importlib.import_module` included), and function-local imports only where they keep an optional
or heavy dependency lazy. The layer table is parsed from docs/architecture.md, its one copy."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "mini_internvl_jax"
REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / PACKAGE
DOCS = REPO / "docs" / "architecture.md"


def read_layer_table(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(top-level module or package -> layer, layer -> the layers it may import, itself included)
    from the `| layer | packages | may import | ... |` table."""
    owner, allowed = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"[a-z]+", cells[0]) or cells[0] == "layer":
            continue
        layer = cells[0]
        for name in re.findall(r"`([^`]+)`", cells[1]):
            owner["" if name == "__init__.py" else name.rstrip("/")] = layer
        allowed[layer] = {x.strip() for x in cells[2].split(",")} | {layer}
    assert allowed, f"no layer table found in {DOCS}"
    return owner, allowed


OWNER, ALLOWED = read_layer_table(DOCS.read_text())
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
    (f"{PACKAGE}.data", f"{PACKAGE}.data"): "data/__init__ loads its pipeline modules by name "
                                            "on first use, so grain stays lazy",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def group(module: str, owner: dict[str, str] = OWNER) -> str:
    first = module.split(".")[1] if "." in module else ""
    if first in owner:
        return owner[first]
    raise AssertionError(f"{module} is in no layer: add it to the table in {DOCS}")


def _resolve(name: str, modules=MODULES) -> str:
    """The package module an import names (`pkg.mod.Class` -> `pkg.mod`; a name of the root
    package, `pkg.load_pretrained`, -> `pkg`)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _import_module_target(node: ast.AST) -> str | None:
    """The module named by `importlib.import_module("pkg.mod")` or `import_module(f"pkg.{x}")`
    (an f-string counts up to its first placeholder)."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name != "import_module":
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def imports_of(mod: str, source: str, is_init: bool = False) -> list[tuple[str, str, bool, int]]:
    """(importer, imported name, inside a function, line) for every import in one module's
    source, `importlib.import_module` calls included."""
    tree = ast.parse(source)
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod if is_init else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" for a in node.names]
        elif (target := _import_module_target(node)) is not None:
            names = [target]
        else:
            continue
        for name in names:
            out.append((mod, name, id(node) in local, node.lineno))
    return out


def imports() -> list[tuple[str, str, bool, int]]:
    out = []
    for mod, path in MODULES.items():
        out += imports_of(mod, path.read_text(), path.name == "__init__.py")
    return out


IMPORTS = imports()


def package_edges(imports=IMPORTS, modules=MODULES) -> set[tuple[str, str]]:
    """Import edges between package modules. A name taken from the root package
    (`from mini_internvl_jax import load_pretrained`) is an edge to the root (layer `api`);
    `import mini_internvl_jax.x.y` is one to `x.y`, not to the root Python runs first."""
    return {(a, _resolve(b, modules)) for a, b, _, _ in imports
            if b.split(".")[0] == PACKAGE and _resolve(b, modules) != a}


def upward_imports(imports=IMPORTS, modules=MODULES, owner=OWNER, allowed=ALLOWED) -> list[str]:
    return sorted(f"{a} ({group(a, owner)}) imports {b} ({group(b, owner)})"
                  for a, b in package_edges(imports, modules)
                  if group(b, owner) not in allowed[group(a, owner)])


def test_root_package_stays_light():
    eager = {_resolve(b) for a, b, local, _ in IMPORTS
             if a == PACKAGE and not local and b.split(".")[0] == PACKAGE}
    assert {group(m) for m in eager} <= {"core"}, eager


def test_every_module_has_a_layer():
    for mod in MODULES:
        group(mod)


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source,culprit", [
    ("from mini_internvl_jax import load_pretrained", f"imports {PACKAGE} (api)"),
    ("import importlib\nimportlib.import_module('mini_internvl_jax.train.trainer')",
     f"imports {PACKAGE}.train.trainer (train)"),
    ("from importlib import import_module\n"
     "def f(x):\n    return import_module(f'mini_internvl_jax.cli.{x}')",
     f"imports {PACKAGE}.cli (cli)"),
])
def test_the_check_catches_root_and_import_module_imports(source, culprit):
    """The test of the test: a kernels module importing the facade, or naming a higher layer to
    importlib, is reported; the same module importing core is not."""
    fake = f"{PACKAGE}.kernels.fake"
    modules = {**MODULES, fake: Path("fake.py")}
    bad = upward_imports(imports_of(fake, source), modules)
    assert bad == [f"{fake} (kernels) {culprit}"], bad
    assert not upward_imports(imports_of(fake, "from mini_internvl_jax import sharding"), modules)


def test_the_layer_table_is_read_from_the_docs():
    owner, allowed = read_layer_table(DOCS.read_text())
    assert owner["configlib"] == "core" and owner["tools"] == "tools" and owner[""] == "api"
    assert allowed["tools"] == {"core", "kernels", "models", "data", "convert", "tools"}
    assert "tools" in allowed["train"] and "train" not in allowed["infer"]


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



def test_the_data_layer_and_the_batch_contract_import_no_jax():
    """The pipeline and the contract are numpy-only (host code, Grain workers); putting a batch
    on the devices is `placement.py`'s. (Imports for type checkers only do not count.)"""
    bad = []
    for mod, path in MODULES.items():
        if mod != f"{PACKAGE}.batch" and group(mod) != "data":
            continue
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If)
                       and ast.unparse(f.test) == "TYPE_CHECKING" for n in ast.walk(f)}
        bad += [f"{mod}:{a, b, line}" for a, b, _, line in IMPORTS if a == mod
                and b.split(".")[0] in ("jax", "flax")
                and not any(isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno == line
                            and id(n) in typing_only for n in ast.walk(tree))]
    assert not bad, "\n".join(bad)
