"""pytest plugin of the harness (``-p compat.pytest_plugin``): TransferQueue's tests, one outcome each.

With ``--compat-target=tq_loader`` the tests listed in compat/excluded.toml are skipped and reported
``excluded``, the scaffolding fixtures it names are replaced (compat/fixtures.py) and the
message-text rule applies (compat/messages.py). With ``transferqueue`` (the reference run in
.venv-tq) nothing is changed. Either way Ray gets the harness defaults (compat/ray_defaults.py) and
every outcome is written to ``--compat-json`` after each test, so a run killed on a hang keeps what
it had. Outcomes: passed, passed_message_only, failed, excluded, skipped (by the test's own condition).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from compat import data, fixtures, messages, ray_defaults


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tq-compat", "TransferQueue compatibility harness")
    group.addoption("--compat-target", choices=("tq_loader", "transferqueue"), default="tq_loader")
    group.addoption("--compat-json", default=None, help="write each test's outcome to this JSON file")


def pytest_configure(config: pytest.Config) -> None:
    ray_defaults.apply()
    target = config.getoption("compat_target")
    json_path = config.getoption("compat_json")
    if target == "tq_loader":
        messages.install()
    recorder = Recorder(target, data.load(), Path(json_path) if json_path else None, config.rootpath)
    config.pluginmanager.register(recorder, "tq-compat-recorder")


class _ScaffoldingOverridden(pytest.Module):
    """A test module whose scaffolding fixtures are swapped for compat/fixtures.py before collection."""

    override: data.FixtureOverride

    def _getobj(self) -> Any:
        module = super()._getobj()
        for name in self.override.fixtures:
            if not hasattr(module, name):
                raise ValueError(f"compat/excluded.toml: {self.override.module} has no fixture {name!r}")
            setattr(module, name, fixtures.REPLACEMENTS[name])
        return module


class Recorder:
    """Applies the data file and records one outcome per collected test."""

    def __init__(self, target: str, harness: data.HarnessData, json_path: Path | None, root: Path) -> None:
        self.target = target
        self.data = harness
        self.json_path = json_path
        self.root = root
        self.results: dict[str, dict[str, Any]] = {}
        self.matched_exclusions: set[str] = set()
        self.message_only: dict[str, str] = {}

    @property
    def on_tq_loader(self) -> bool:
        return self.target == "tq_loader"

    def pytest_pycollect_makemodule(
        self, module_path: Path, parent: pytest.Collector
    ) -> pytest.Module | None:
        if not self.on_tq_loader:
            return None
        override = self.data.override_for(module_path.relative_to(self.root).as_posix())
        if override is None:
            return None
        module = _ScaffoldingOverridden.from_parent(parent, path=module_path)
        module.override = override
        return module

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:  # after -k / --deselect
            self.results[item.nodeid] = {"outcome": "not run"}
            exclusion = self.data.exclusion_for(item.nodeid) if self.on_tq_loader else None
            if exclusion is not None:
                self.matched_exclusions.add(exclusion.test)
                item.add_marker(
                    pytest.mark.skip(reason=f"excluded ({exclusion.category}): {exclusion.reason}")
                )
                self.results[item.nodeid] = {"outcome": "excluded", "category": exclusion.category}
        self._write()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        messages.reset()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if self.on_tq_loader and report.when == "call" and report.failed and call.excinfo is not None:
            line = _message_only_failure(item, call.excinfo)
            if line is not None:
                self.message_only[item.nodeid] = line
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.results.setdefault(report.nodeid, {"outcome": "not run"})
        if entry["outcome"] in ("excluded", "failed"):
            return
        if report.skipped:
            entry.update(outcome="skipped", reason=_crash(report))
        elif report.failed:
            if report.nodeid in self.message_only:
                entry.update(outcome="passed_message_only", message_assert=self.message_only[report.nodeid])
                entry["error"] = _crash(report)
            else:
                entry.update(outcome="failed", phase=report.when, error=_crash(report))
        elif report.when == "call":
            diffs = list(messages.recorded) if self.on_tq_loader else []
            entry.update(outcome="passed_message_only" if diffs else "passed")
            if diffs:
                entry["message_diffs"] = diffs
        self._write()

    def pytest_sessionfinish(self) -> None:
        self._write()

    def _write(self) -> None:
        if self.json_path is None:
            return
        payload = {
            "target": self.target,
            "tests": self.results,
            "matched_exclusions": sorted(self.matched_exclusions),
        }
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        tmp.replace(self.json_path)


def _crash(report: pytest.TestReport) -> str:
    """One line that says how a test ended: the exception, or the skip reason."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, lineno, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message.splitlines()[0] if crash.message else ''} ({Path(crash.path).name}:{crash.lineno})"
    return str(longrepr).strip().splitlines()[-1] if longrepr else ""


def _message_only_failure(item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    """The failing line if it is a trailing ``assert ... in str(e.value)`` of the test, else None."""
    function = getattr(item, "function", None)
    if function is None or not isinstance(excinfo.value, AssertionError):
        return None
    entries = [e for e in excinfo.traceback if Path(e.path) == Path(item.path)]
    if not entries:
        return None
    failing_lineno = entries[-1].lineno + 1  # 1-based
    lines, start = inspect.getsourcelines(function)
    index = failing_lineno - start
    if not 0 <= index < len(lines):
        return None
    if messages.is_trailing_message_assert(lines, index):
        return lines[index].strip()
    return None
