"""The opt-in ``transfer_queue`` alias: tq_loader.compat.alias_transfer_queue() and the .pth hook.

Each case runs in a fresh interpreter (the alias changes ``sys.meta_path`` for good), with and
without ``TQ_LOADER_ALIAS_TRANSFER_QUEUE``, and with a fake real ``transfer_queue`` on the path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

ENV_VAR = "TQ_LOADER_ALIAS_TRANSFER_QUEUE"
REPO = Path(__file__).resolve().parent.parent


def run_python(
    code: str, *, alias_env: str | None = None, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PYTHONPATH")}
    if alias_env is not None:
        env[ENV_VAR] = alias_env
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture
def fake_real_transfer_queue(tmp_path: Path) -> Path:
    """A directory holding a package named ``transfer_queue`` that is not tq_loader."""
    package = tmp_path / "transfer_queue"
    package.mkdir()
    (package / "__init__.py").write_text("IS_FAKE_REAL_TRANSFER_QUEUE = True\n")
    return tmp_path


def test_pth_hook_is_installed_with_the_package() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "tq_loader_alias.pth"
    assert pth.is_file(), f"{pth} missing: `make setup` (pip install -e .) installs it"
    assert "_tq_loader_alias" in pth.read_text() and ENV_VAR in pth.read_text()


def test_env_var_aliases_at_start_without_importing_torch() -> None:
    out = ok(
        run_python(
            """
            import sys
            from _tq_loader_alias import TransferQueueAliasFinder
            assert any(isinstance(f, TransferQueueAliasFinder) for f in sys.meta_path), sys.meta_path
            assert "torch" not in sys.modules and "tq_loader" not in sys.modules
            import transfer_queue as tq
            import tq_loader
            assert tq.init is tq_loader.init and tq.BatchMeta is tq_loader.BatchMeta
            assert tq.StreamingDataLoader is tq_loader.StreamingDataLoader
            from transfer_queue.metadata import BatchMeta, KVBatchMeta
            from transfer_queue.sampler import BaseSampler
            from transfer_queue.sampler.sequential_sampler import SequentialSampler
            from transfer_queue.sampler.seqlen_balanced_sampler import get_seqlen_balanced_partitions
            from transfer_queue.dataloader.streaming_dataset import chunk_batch_fn
            from transfer_queue.client import TransferQueueClient
            import transfer_queue.interface as iface
            assert SequentialSampler is tq_loader.SequentialSampler and KVBatchMeta is tq_loader.KVBatchMeta
            assert TransferQueueClient is tq_loader.TransferQueueClient and iface.kv_put is tq_loader.kv_put
            assert not hasattr(tq_loader, "sampler") and not hasattr(tq_loader, "interface")  # untouched
            assert tq_loader.__spec__.name == "tq_loader"
            import pickle
            assert pickle.loads(pickle.dumps(tq)) is tq  # by reference, as modules pickle
            print(tq.__name__, repr(tq))
            """,
            alias_env="1",
        )
    )
    assert "transfer_queue <module 'transfer_queue' (alias of tq_loader)>" in out


def test_without_env_var_transfer_queue_is_not_importable() -> None:
    result = run_python("import transfer_queue")
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'transfer_queue'" in result.stderr


def test_env_var_other_than_1_warns_and_installs_nothing() -> None:
    result = run_python("import transfer_queue", alias_env="yes")
    assert result.returncode != 0 and "No module named 'transfer_queue'" in result.stderr
    assert f"{ENV_VAR}='yes' is not understood" in result.stderr
    ok(run_python("import sys; assert 'transfer_queue' not in sys.modules", alias_env="0"))


def test_alias_function_is_idempotent_and_internal_paths_say_so() -> None:
    ok(
        run_python(
            """
            import sys
            from tq_loader.compat import alias_transfer_queue
            from _tq_loader_alias import TransferQueueAliasFinder
            alias_transfer_queue()
            alias_transfer_queue()
            assert sum(isinstance(f, TransferQueueAliasFinder) for f in sys.meta_path) == 1
            import transfer_queue
            assert transfer_queue.kv_batch_get.__module__.startswith("tq_loader")
            try:
                import transfer_queue.utils.logging_utils
            except ModuleNotFoundError as exc:
                assert "TransferQueue's internals" in str(exc) and "transfer_queue.metadata" in str(exc), exc
            else:
                raise AssertionError("an internal TransferQueue path was importable")
            try:
                transfer_queue.no_such_name  # (get_metrics_endpoint is offered now)
            except AttributeError as exc:
                assert "alias of 'tq_loader'" in str(exc) and "docs/compat.md" in str(exc), exc
            else:
                raise AssertionError("a name tq_loader does not offer resolved")
            """
        )
    )


def test_alias_refuses_to_shadow_a_real_transfer_queue(fake_real_transfer_queue: Path) -> None:
    ok(
        run_python(
            """
            from tq_loader.compat import TransferQueueConflictError, alias_transfer_queue
            from tq_loader.errors import TQError
            try:
                alias_transfer_queue()
            except TransferQueueConflictError as exc:
                assert isinstance(exc, TQError) and isinstance(exc, ImportError)
                assert "a real TransferQueue is importable" in str(exc) and "pip uninstall" in str(exc), exc
            else:
                raise AssertionError("aliased over a real TransferQueue")
            import transfer_queue
            assert transfer_queue.IS_FAKE_REAL_TRANSFER_QUEUE  # not shadowed
            try:
                alias_transfer_queue()  # already imported: still refused
            except TransferQueueConflictError:
                pass
            else:
                raise AssertionError("aliased over an imported TransferQueue")
            """,
            pythonpath=fake_real_transfer_queue,
        )
    )


def test_env_var_alias_refuses_to_shadow_a_real_transfer_queue(fake_real_transfer_queue: Path) -> None:
    result = run_python("import transfer_queue", alias_env="1", pythonpath=fake_real_transfer_queue)
    assert result.returncode != 0
    assert "TransferQueueConflictError" in result.stderr and str(fake_real_transfer_queue) in result.stderr


def test_ray_worker_gets_the_alias_through_its_runtime_env() -> None:
    ray = pytest.importorskip("ray")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=1,
        log_to_driver=False,
        runtime_env={"env_vars": {ENV_VAR: "1"}},
    )
    try:
        from tq_loader.compat import alias_transfer_queue

        alias_transfer_queue()  # this process too: the task below closes over the aliased module
        import transfer_queue as tq

        @ray.remote(num_cpus=0)
        def aliased_in_worker() -> tuple[str, str]:
            import transfer_queue

            return transfer_queue.BatchMeta.__module__, tq.StreamingDataset.__module__

        assert ray.get(aliased_in_worker.remote(), timeout=120) == (
            "tq_loader.metadata",
            "tq_loader.loader.dataset",
        )
    finally:
        ray.shutdown()
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "TransferQueueAliasFinder"]
        for name in [m for m in sys.modules if m == "transfer_queue" or m.startswith("transfer_queue.")]:
            del sys.modules[name]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_built_wheel_carries_the_hook_at_its_root(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "_tq_loader_alias.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "tq_loader", source / "tq_loader", ignore=shutil.ignore_patterns("__pycache__"))
    ok_build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok_build.returncode == 0, ok_build.stderr
    (wheel,) = tmp_path.glob("tq_loader-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "tq_loader_alias.pth" in names and "_tq_loader_alias.py" in names and "tq_loader/compat.py" in names
    )
    line = zipfile.ZipFile(wheel).read("tq_loader_alias.pth").decode()
    assert line.startswith("import os;") and line.count("\n") == 1  # one cheap line: site.py executes it


def _harness_messages() -> Any:
    """compat/messages.py (the harness is not an installed package)."""
    spec = importlib.util.spec_from_file_location(
        "compat_messages_under_test", REPO / "compat" / "messages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_counts_a_message_only_difference_only_when_the_type_matches() -> None:
    messages = _harness_messages()
    messages.reset()
    with messages.tolerant_raises(ValueError, match="count mismatch"):
        raise ValueError("3 storage units in the checkpoint, 2 here")
    assert messages.recorded == [
        {
            "type": "ValueError",
            "expected_match": "count mismatch",
            "message": "3 storage units in the checkpoint, 2 here",
        }
    ]
    with pytest.raises(KeyError), messages.tolerant_raises(ValueError, match="x"):  # a wrong type propagates
        raise KeyError("x")
    with (
        pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"),
        messages.tolerant_raises(ValueError, match="x"),
    ):
        pass
    messages.reset()
    with messages.tolerant_raises(ValueError, match="dup"):
        raise ValueError("duplicated keys")
    assert messages.recorded == []


def test_harness_message_assert_rule_needs_nothing_but_message_asserts_after_it() -> None:
    rule = _harness_messages().is_trailing_message_assert
    raises_block = [
        "    with pytest.raises(ValueError) as exc_info:\n",
        "        KVBatchMeta(keys=['k', 'k'])\n",
        '    assert "Got duplicated keys" in str(exc_info.value)\n',
        '    assert "sample" in str(exc_info.value)\n',
        "\n",
    ]
    assert rule(raises_block, 2) and rule(raises_block, 3)
    assert not rule([*raises_block, "    assert meta.size == 0\n"], 2)  # more than text was left unrun
    assert not rule(["    assert meta.size == 0\n"], 0)
    handler = [
        "    try:\n",
        "        tq.kv_batch_get(keys='missing')\n",
        "    except ValueError as e:\n",
        '        assert "not found" in str(e).lower() or "empty" in str(e).lower()\n',
    ]
    assert rule(handler, 3)
    assert not rule(['    assert "0" in str(result)\n'], 0)  # not a caught exception
