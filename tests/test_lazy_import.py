"""``import tq_loader`` is lazy (PEP 562): the CLI's ``--help`` imports neither torch nor Ray nor
tensordict, and every public name still resolves on first access."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "tensordict")


def imported_modules(*argv: str) -> set[str]:
    """Top-level modules ``python -X importtime ARGV`` imported (importtime writes one line each)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "tq_loader" in names  # the probe itself works
    return names


@pytest.mark.parametrize(
    "argv",
    [("-m", "tq_loader", "--help"), ("-m", "tq_loader", "status", "--help"), ("-m", "tq_loader", "demo", "--help"),
     ("-c", "import tq_loader")],
    ids=["help", "status-help", "demo-help", "import"],
)  # fmt: skip
def test_help_imports_no_heavy_module(argv: tuple[str, ...]) -> None:
    assert not set(HEAVY) & imported_modules(*argv)


def test_console_script_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\nfrom tq_loader.app.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_every_public_name_resolves() -> None:
    import tq_loader as tq

    assert len(tq.__all__) == len(set(tq.__all__)) > 40
    missing = [name for name in tq.__all__ if getattr(tq, name, None) is None]
    assert not missing
    assert tq.StorageKeyNotFoundError is tq.NotFoundError
    assert callable(tq.init) and callable(tq.kv_put) and issubclass(tq.ArgumentError, tq.TQError)
    assert set(tq.__all__) <= set(dir(tq))
    assert tq.api.ENV_ADDRESS == "TQ_LOADER_ADDRESS"  # submodules resolve as attributes too
    with pytest.raises(AttributeError, match="no_such_name"):
        tq.no_such_name  # noqa: B018


def test_lazy_table_matches_all() -> None:
    import tq_loader as tq

    assert set(tq.__all__) == {*tq._EXPORTS, *tq._ALIASES, "__version__"}
    for name, module in tq._EXPORTS.items():
        assert getattr(tq, name) is getattr(sys.modules[module], name)
