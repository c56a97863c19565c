"""What the wheel must carry sits inside the package directory (package data), so an installed
tq_loader finds its Hydra configs, its typing marker and the benchmark suite without a clone."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tq_loader
from tq_loader.app.config import CONFIG_DIR, compose

PKG = Path(tq_loader.__file__).resolve().parent
ROOT = PKG.parent


def test_configs_are_package_data() -> None:
    assert CONFIG_DIR == PKG / "configs"
    for rel in ("config.yaml", "loader/default.yaml", "sampler/seqlen_balanced.yaml", "sampler/grpo.yaml",
                "storage/simple.yaml", "placement/ray.yaml", "demo/default.yaml"):  # fmt: skip
        assert (CONFIG_DIR / rel).is_file(), rel
    assert not (ROOT / "configs").exists()  # one home for the YAML


def test_seqlen_balanced_composes_from_the_package_dir() -> None:
    assert compose(["sampler=seqlen_balanced"]).loader.sampler == "seqlen_balanced"


def test_typing_marker_app_and_bench_are_in_the_package() -> None:
    assert (PKG / "py.typed").is_file()
    assert (PKG / "__main__.py").is_file() and (PKG / "app" / "cli.py").is_file()
    assert (PKG / "bench" / "__init__.py").is_file() and (PKG / "bench" / "drivers").is_dir()


def test_pyproject_ships_them() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["tq-loader"] == "tq_loader.app.cli:main"
    data = meta["tool"]["setuptools"]["package-data"]["tq_loader"]
    assert {"py.typed", "configs/*.yaml", "configs/*/*.yaml", "bench/drivers/*"} <= set(data)
    every_yaml = {p.relative_to(PKG).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}
    matched = {y for y in every_yaml if y.count("/") in (1, 2)}  # configs/*.yaml and configs/*/*.yaml
    assert matched == every_yaml  # no YAML nested deeper than the globs reach
    assert "prometheus_client" in " ".join(meta["project"]["dependencies"])
