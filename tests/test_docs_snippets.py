"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh process.

A block that cannot run on its own (a multi-node deploy recipe, say) is marked by the comment
line ``<!-- not-run: <reason> -->`` as the last non-blank line before its opening fence; the
reason is required and :func:`test_not_run_blocks_say_why` lists every such block with it, so
skipped snippets stay visible and rare. Nothing else is skipped: a block that fails is a doc
that lies.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 180  # seconds per block
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced blocks whose info string is ``python`` (``py`` too), with their not-run marks."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        ticks, lang = m["ticks"], m["info"].strip().split(" ")[0].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][len(m["indent"]) :] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        mark = NOT_RUN.match(before)
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n", mark["reason"] if mark else None))
    return blocks


BLOCKS = [b for path in DOCS if path.exists() for b in python_blocks(path)]
RUN = [b for b in BLOCKS if b.not_run is None]


def test_the_extractor_finds_readme_snippets() -> None:
    readme = [b for b in BLOCKS if b.path.name == "README.md"]
    assert len(readme) >= 3, "README.md should show the DataLoader, KV and Lightning snippets"


def test_not_run_blocks_say_why() -> None:
    marked = [b for b in BLOCKS if b.not_run is not None]
    for block in marked:
        assert block.not_run, f"{block.name}: a not-run mark needs a reason"
    print("\n".join(f"not run: {b.name}: {b.not_run}" for b in marked) or "every block runs")
    assert len(marked) <= max(2, len(BLOCKS) // 4), "most snippets must run; mark only what cannot"


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_snippet_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_LOADER_")}  # its own cluster
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, (
        f"{block.name} failed (exit {proc.returncode}):\n{block.code}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------- links and paths
LINKED = [*DOCS, ROOT / "tutorial" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# paths of this repository (TransferQueue's own tests/... paths are named in compat.md too, so not tests/)
CODE_PATH = re.compile(
    r"`(?P<path>(?:tq_loader|tutorial|examples|docs|compat)/[A-Za-z0-9_./-]+\.(?:py|md|toml))`"
)


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links only outside code blocks
    return [m["target"] for m in LINK.finditer(text)]


@pytest.mark.parametrize("path", [p for p in LINKED if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_stay_inside_the_repository_and_resolve(path: Path) -> None:
    bad = []
    for target in _links(path):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue  # an anchor on the same page
        resolved = (path.parent / file_part).resolve()
        if ROOT not in resolved.parents and resolved != ROOT:
            bad.append(f"{target} (leaves the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file)")
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


@pytest.mark.parametrize("path", [p for p in LINKED if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_source_paths_named_in_docs_exist(path: Path) -> None:
    missing = sorted(
        {m["path"] for m in CODE_PATH.finditer(path.read_text()) if not (ROOT / m["path"]).exists()}
    )
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"


# ----------------------------------------------------------------------------- docs/architecture.md's rules
def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at top level)`` for every import in ``path``."""
    import ast

    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, id(node) in top))
    return out


LIBRARY = [
    p
    for p in sorted((ROOT / "tq_loader").rglob("*.py"))
    if not {"app", "bench"} & set(p.relative_to(ROOT / "tq_loader").parts[:1]) and p.name != "__main__.py"
]


def test_the_library_never_imports_the_app() -> None:
    upward = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in LIBRARY
        for m, _ in _imports(p)
        if m.startswith(("tq_loader.app", "tq_loader.bench"))
    ]
    assert not upward, upward


def test_ray_is_imported_at_module_level_only_by_the_ray_placement() -> None:
    eager = [
        str(p.relative_to(ROOT))
        for p in LIBRARY
        for m, top in _imports(p)
        if top and (m == "ray" or m.startswith("ray."))
    ]
    assert eager == ["tq_loader/ray_cluster.py"] * len(eager) and eager, eager


def _layer_table_modules() -> set[str]:
    """The module names in the 'modules' column of docs/architecture.md's layer table."""
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| layer | modules |"))
    names: set[str] = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names |= {n.rstrip("/") for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*/?)`", line.split("|")[2])}
    return names


def test_the_layer_table_names_every_module_and_only_real_ones() -> None:
    pkg = ROOT / "tq_loader"
    real = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    real |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    listed = _layer_table_modules()
    assert not listed - real, f"docs/architecture.md names modules that do not exist: {sorted(listed - real)}"
    assert not real - listed, f"docs/architecture.md's layer table lacks {sorted(real - listed)}"
