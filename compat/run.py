"""``make compat``: TransferQueue 0.1.11's tutorials and public-API tests, run against tq_loader.

The tutorials (``tutorial/01..06``) and tests (compat/data.py: ``TEST_PATHS``) are taken from the
TransferQueue wheel installed in ``.venv-tq/`` (its RECORD lists them) and copied into a scratch
folder, ``.venv-tq/compat-run/``, where no ``transfer_queue`` package sits beside them. They then run
in the project's ``.venv`` with ``TQ_LOADER_ALIAS_TRANSFER_QUEUE=1``, so ``import transfer_queue``
is tq_loader (tq_loader.compat). ``--against transferqueue`` runs the same files in ``.venv-tq``
on TransferQueue itself, without exclusions, as the reference. Each test file and tutorial runs
in its own process group with a time limit; logs and outcomes stay in the scratch folder.

    python -m compat.run [--against tq_loader|transferqueue] [--json PATH] [-k EXPR] [--only tutorials|tests]
    python -m compat.run --exclusions-md     # the exclusion list as a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _tq_loader_alias import ENV_VAR as ALIAS_ENV
from compat import data, ray_defaults

REPO = Path(__file__).resolve().parent.parent
TQ_VENV = REPO / ".venv-tq"
PROJECT_VENV = REPO / ".venv"
WORK = TQ_VENV / "compat-run"
TQ_DIST = "transferqueue-0.1.11.dist-info"
TUTORIAL_TIMEOUT_S = 420
TEST_FILE_TIMEOUT_S = 1500
TEST_TIMEOUT_S = 180  # pytest-timeout, per test: a hang fails one test, not the file


@dataclass
class Run:
    name: str
    returncode: int | None  # None: killed at the time limit
    seconds: float
    log: Path


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"{venv} has no site-packages: run `make compat` (it creates the venv)")
    return found[-1]


def wheel_files(site: Path) -> list[str]:
    """The tutorial and test files of the installed TransferQueue wheel, from its RECORD."""
    record = site / TQ_DIST / "RECORD"
    if not record.exists():
        raise SystemExit(
            f"TransferQueue 0.1.11 is not installed in {TQ_VENV} ({record} missing): run `make compat`"
        )
    paths = [line.split(",", 1)[0] for line in record.read_text(encoding="utf-8").splitlines()]
    return [p for p in paths if p.endswith(".py") and p.split("/", 1)[0] in ("tutorial", "tests")]


def prepare_workdir(site: Path) -> None:
    """Copy the wheel's tutorials and tests into a fresh scratch folder (outside the repository's tree)."""
    if WORK.exists():
        shutil.rmtree(WORK)
    for rel in wheel_files(site):
        target = WORK / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, target)
    (WORK / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # pins the rootdir here
    (WORK / "logs").mkdir()


def child_env(against: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ALIAS_ENV}
    env.update(ray_defaults.ENV)
    env["PYTHONPATH"] = str(REPO)  # the harness package; tq_loader itself comes from .venv
    if against == "tq_loader":
        env[ALIAS_ENV] = "1"
    return env


def run_logged(name: str, argv: list[str], env: dict[str, str], timeout: float) -> Run:
    """Run ``argv`` in its own process group; on the time limit stop that group (only it)."""
    log = WORK / "logs" / f"{name}.log"
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            argv, cwd=WORK, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            returncode = None
    return Run(name, returncode, time.monotonic() - start, log)


def check_alias(python: Path, env: dict[str, str]) -> None:
    probe = subprocess.run(
        [str(python), "-c", "import transfer_queue, tq_loader; assert transfer_queue.init is tq_loader.init"],
        env=env,
        cwd=WORK,
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise SystemExit(
            "the transfer_queue alias does not work in .venv (run `make setup`, which installs the "
            f"tq_loader_alias.pth hook):\n{probe.stderr.strip()}"
        )


def run_tutorials(python: Path, env: dict[str, str], harness: data.HarnessData) -> list[dict[str, Any]]:
    results = []
    for name in data.TUTORIALS:
        script = WORK / "tutorial" / f"{name}.py"
        run = run_logged(
            f"tutorial-{name}", [str(python), "-m", "compat.tutorial", str(script)], env, TUTORIAL_TIMEOUT_S
        )
        output = run.log.read_text(encoding="utf-8", errors="replace")
        lost = [p for p in harness.must_not_print.get(name, ()) if p in output]
        ok = run.returncode == 0 and not lost
        if run.returncode is None:
            why = f"killed after {TUTORIAL_TIMEOUT_S} s"
        elif run.returncode != 0:
            why = f"exit {run.returncode}: {_last_error(output)}"
        elif lost:
            why = f"ran to the end but printed {lost}"
        else:
            why = ""
        results.append(
            {"name": name, "ok": ok, "why": why, "seconds": round(run.seconds, 1), "log": str(run.log)}
        )
        print(f"  tutorial {name}: {'ok' if ok else 'FAIL'} ({run.seconds:.0f} s) {why}", flush=True)
    return results


def run_tests(
    python: Path, env: dict[str, str], against: str, keyword: str | None
) -> dict[str, dict[str, Any]]:
    outcomes: dict[str, dict[str, Any]] = {}
    files = sorted(
        str(p.relative_to(WORK))
        for test_path in data.TEST_PATHS
        for p in (
            [WORK / test_path] if test_path.endswith(".py") else sorted((WORK / test_path).glob("test_*.py"))
        )
    )
    matched: set[str] = set()
    for rel in files:
        json_path = WORK / "logs" / (rel.replace("/", "_") + ".json")
        argv = [str(python), "-m", "pytest", rel, "-p", "compat.pytest_plugin", f"--compat-target={against}"]
        argv += [
            f"--compat-json={json_path}",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rN",
            f"--timeout={TEST_TIMEOUT_S}",
        ]
        if keyword:
            argv += ["-k", keyword]
        run = run_logged(rel.replace("/", "_"), argv, env, TEST_FILE_TIMEOUT_S)
        file_outcomes = json.loads(json_path.read_text()) if json_path.exists() else {"tests": {}}
        matched.update(file_outcomes.get("matched_exclusions", []))
        tests = file_outcomes["tests"]
        if run.returncode is None:
            for entry in tests.values():
                if entry["outcome"] == "not run":
                    entry.update(
                        outcome="failed", phase="run", error=f"file killed after {TEST_FILE_TIMEOUT_S} s"
                    )
        if not tests and run.returncode not in (0, 5):
            tests[rel] = {"outcome": "failed", "phase": "collect", "error": _last_error(run.log.read_text())}
        outcomes.update(tests)
        counts = _count(tests)
        print(f"  {rel}: {_format_counts(counts)} ({run.seconds:.0f} s)", flush=True)
    stale = (
        sorted({e.test for e in data.load().exclusions} - matched)
        if against == "tq_loader" and not keyword
        else []
    )
    if stale:
        print(f"  stale exclusions (match no collected test): {stale}", flush=True)
    return outcomes


def _count(tests: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return counts


def _format_counts(counts: dict[str, int]) -> str:
    passed = counts.get("passed", 0) + counts.get("passed_message_only", 0)
    parts = [f"{passed} passed"]
    if counts.get("passed_message_only"):
        parts[0] += f" ({counts['passed_message_only']} message text only)"
    for key in ("failed", "excluded", "skipped", "not run"):
        if counts.get(key):
            parts.append(f"{counts[key]} {key}")
    return ", ".join(parts)


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or ln.startswith("E ")]
    return (errors or lines or ["(no output)"])[-1][:300]


def exclusions_markdown(harness: data.HarnessData) -> str:
    """The exclusions and scaffolding overrides as Markdown tables (for docs/compat.md)."""
    rows = ["| TransferQueue test | why it is not run on tq_loader |", "|---|---|"]
    rows += [f"| `{e.test}` | {e.category}: {e.reason} |" for e in harness.exclusions]
    rows += ["", "| test module | scaffolding replaced on tq_loader |", "|---|---|"]
    rows += [f"| `{o.module}` (`{', '.join(o.fixtures)}`) | {o.reason} |" for o in harness.overrides]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", choices=("tq_loader", "transferqueue"), default="tq_loader")
    parser.add_argument("--json", type=Path, help="write all outcomes (tutorials and tests) here")
    parser.add_argument("-k", dest="keyword", help="only tests matching this pytest -k expression")
    parser.add_argument("--only", choices=("tutorials", "tests"))
    parser.add_argument(
        "--exclusions-md", action="store_true", help="print the exclusions as a Markdown table"
    )
    args = parser.parse_args(argv)

    harness = data.load()
    if args.exclusions_md:
        print(exclusions_markdown(harness))
        return 0
    site = site_packages(TQ_VENV)
    prepare_workdir(site)
    python = (PROJECT_VENV if args.against == "tq_loader" else TQ_VENV) / "bin" / "python"
    env = child_env(args.against)
    if args.against == "tq_loader":
        check_alias(python, env)
    print(f"TransferQueue 0.1.11 tutorials and public-API tests against {args.against} ({WORK})", flush=True)

    tutorials = run_tutorials(python, env, harness) if args.only != "tests" else []
    tests = run_tests(python, env, args.against, args.keyword) if args.only != "tutorials" else {}

    counts = _count(tests)
    passed = counts.get("passed", 0) + counts.get("passed_message_only", 0)
    considered = len(tests) - counts.get("excluded", 0) - counts.get("skipped", 0)
    print("")
    if tutorials:
        print(f"tutorials run to the end: {sum(t['ok'] for t in tutorials)}/{len(tutorials)}")
    if tests:
        rate = f"{100 * passed / considered:.1f} %" if considered else "n/a"
        print(
            f"tests: {len(tests)} collected: {_format_counts(counts)}; pass rate {passed}/{considered} = {rate}"
        )
        failed = sorted(n for n, e in tests.items() if e["outcome"] == "failed")
        for nodeid in failed:
            why = harness.deliberate.get(nodeid)
            tag = f"DIFFERS ON PURPOSE ({why})" if why else "FAILED"
            print(f"  {tag} {nodeid}: {tests[nodeid].get('error', '')}")
    if args.json:
        args.json.write_text(
            json.dumps({"against": args.against, "tutorials": tutorials, "tests": tests}, indent=1)
        )
    unexpected = [n for n, e in tests.items() if e["outcome"] == "failed" and n not in harness.deliberate]
    all_ok = all(t["ok"] for t in tutorials) and not unexpected
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
