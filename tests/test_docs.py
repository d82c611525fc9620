"""The documentation's names exist: every `from prefix_attn... import ...` and every
`prefix_attn.<name>` that README.md and docs/*.md use imports, and every relative link points at
a file of the repository."""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS_HF = ("prefix_attn.integrations", "prefix_attn.serve")


def _imports(text: str):
    for module, names in re.findall(r"from (prefix_attn[\w.]*) import ([\w, ()]+)", text):
        for name in re.split(r"[,\s()]+", names):
            if name:
                yield module, name
    for dotted in re.findall(r"(?<!ops\.)\bprefix_attn((?:\.\w+)+)", text):  # not torch.ops.prefix_attn
        parts = dotted.strip(".").split(".")
        yield "prefix_attn", parts[0]


def _cases():
    seen = set()
    for path in DOCS:
        for module, name in _imports(path.read_text()):
            if (module, name) not in seen:
                seen.add((module, name))
                yield pytest.param(module, name, id=f"{path.name}:{module}.{name}")


@pytest.mark.parametrize("module, name", list(_cases()))
def test_documented_name_imports(module, name):
    if module.startswith(NEEDS_HF):
        pytest.importorskip("transformers")
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return
    importlib.import_module(f"{module}.{name}")  # a submodule (prefix_attn.backends, ...)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        if not (path.parent / target).exists():
            missing.append(target)
    assert not missing, f"{path.name} links to missing files: {missing}"
