"""The two layers stay apart: what a project that imports brats_gan as a library relies on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brats_gan"
COMMAND_LAYER = {"commands", "__main__"}


def imported(path: Path) -> set[str]:
    """Every brats_gan module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("brats_gan")}


def library_modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if not COMMAND_LAYER & set(parts):
            out[".".join(("brats_gan", *parts)).removesuffix(".__init__")] = path
    return out


def test_no_library_module_imports_the_command_line() -> None:
    modules = library_modules()
    assert {"brats_gan.train.trainer", "brats_gan.generate", "brats_gan.evaluate"} <= modules.keys()
    offenders = {name: sorted(i for i in imported(path) if i.startswith("brats_gan.commands"))
                 for name, path in modules.items()}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize(("module", "must_not"), [
    ("brats_gan.generate", "brats_gan.preprocess"),
    ("brats_gan.train.trainer", "brats_gan.commands"),
    ("brats_gan.evaluate", "brats_gan.data"),
    ("brats_gan.report", "brats_gan.data"),
    ("brats_gan.metrics", "brats_gan.data"),
])
def test_stages_do_not_import_each_other_sideways(module: str, must_not: str) -> None:
    modules = library_modules()
    paths = [p for name, p in modules.items() if name == module or name.startswith(module + ".")]
    assert paths, module
    for path in paths:
        bad = sorted(i for i in imported(path) if i == must_not or i.startswith(must_not + "."))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
