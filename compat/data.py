"""The harness's data file (compat/excluded.toml): what runs, what is excluded and why.

Kept as data so docs/compat.md can show every exclusion with its reason. Sections:

- ``[[exclude]]`` ``test`` (a pytest node id relative to the wheel root, or a prefix of one ending at
  a ``::`` or ``[`` boundary), ``category``, ``reason``: TransferQueue-internal tests, not run on tq_loader.
- ``[[fixture_override]]`` ``module``, ``fixtures``, ``reason``: test scaffolding (not the behaviour
  under test) replaced on tq_loader by compat/fixtures.py.
- ``[[deliberate]]`` ``test``, ``reason``: public-API tests that still run and fail because tq_loader
  differs on purpose (docs/compat.md says why and what to write instead); reported, not counted as
  passes, and they do not fail ``make compat``.
- ``[tutorial.NAME]`` ``must_not_print``: output that means a tutorial ran to the end but lost data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATA_FILE = Path(__file__).with_name("excluded.toml")

TUTORIALS = [
    "01_core_components",
    "02_kv_interface",
    "03_metadata_concepts",
    "04_understanding_controller",
    "05_custom_sampler",
    "06_streaming_dataloader",
]
TEST_PATHS = [
    "tests/test_metadata.py",
    "tests/test_samplers.py",
    "tests/test_streaming_dataset.py",
    "tests/e2e",
]


@dataclass(frozen=True)
class Exclusion:
    test: str
    category: str
    reason: str

    def matches(self, nodeid: str) -> bool:
        if nodeid == self.test:
            return True
        return nodeid.startswith(self.test) and nodeid[len(self.test)] in ":["


@dataclass(frozen=True)
class FixtureOverride:
    module: str
    fixtures: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class HarnessData:
    exclusions: tuple[Exclusion, ...]
    overrides: tuple[FixtureOverride, ...]
    must_not_print: dict[str, tuple[str, ...]] = field(default_factory=dict)
    deliberate: dict[str, str] = field(default_factory=dict)  # node id -> reason

    def exclusion_for(self, nodeid: str) -> Exclusion | None:
        return next((e for e in self.exclusions if e.matches(nodeid)), None)

    def override_for(self, module: str) -> FixtureOverride | None:
        return next((o for o in self.overrides if o.module == module), None)


def load(path: Path = DATA_FILE) -> HarnessData:
    """Read and check the data file; a malformed entry raises ValueError naming it."""
    raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = set(raw) - {"exclude", "fixture_override", "tutorial", "deliberate"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
    exclusions = tuple(
        Exclusion(_str(e, "test", path), _str(e, "category", path), _str(e, "reason", path))
        for e in raw.get("exclude", [])
    )
    overrides = tuple(
        FixtureOverride(_str(o, "module", path), tuple(o.get("fixtures", ())), _str(o, "reason", path))
        for o in raw.get("fixture_override", [])
    )
    tutorials = raw.get("tutorial", {})
    bad = set(tutorials) - set(TUTORIALS)
    if bad:
        raise ValueError(f"{path}: [tutorial.*] names {sorted(bad)} are not among {TUTORIALS}")
    must_not_print = {name: tuple(t.get("must_not_print", ())) for name, t in tutorials.items()}
    deliberate = {_str(d, "test", path): _str(d, "reason", path) for d in raw.get("deliberate", [])}
    return HarnessData(exclusions, overrides, must_not_print, deliberate)


def _str(entry: dict[str, Any], key: str, path: Path) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: entry {entry} needs a non-empty string {key!r}")
    return value
