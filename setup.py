"""Build hook only (the project's metadata is in pyproject.toml): ship ``tq_loader_alias.pth``.

A ``.pth`` file must sit at the top of site-packages to run at interpreter start, which package
data cannot do. ``build_pth`` writes it at the root of every wheel: into ``build_lib`` for a normal
wheel, and into the unpacked editable wheel (``install_lib`` there) for ``pip install -e .``, whose
``build_lib`` is thrown away. The line it writes only reads an environment variable unless
``TQ_LOADER_ALIAS_TRANSFER_QUEUE`` is set; see _tq_loader_alias.py and tq_loader/compat.py.
"""

from __future__ import annotations

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "tq_loader_alias.pth"
PTH_LINE = (
    'import os; os.environ.get("TQ_LOADER_ALIAS_TRANSFER_QUEUE", "0") not in ("", "0") '
    'and __import__("_tq_loader_alias").install_from_env()\n'
)


class build_pth(Command):
    """Write the start-up hook ``tq_loader_alias.pth`` at the root of the wheel being built."""

    description = "write the TQ_LOADER_ALIAS_TRANSFER_QUEUE start-up hook (.pth) into the wheel"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False  # set by setuptools' editable_wheel
        self._written: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        assert root is not None
        os.makedirs(root, exist_ok=True)
        target = os.path.join(root, PTH_NAME)
        with open(target, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
        self._written = [target]

    def get_outputs(self) -> list[str]:
        # An editable wheel takes the file from its unpacked tree, not from the build outputs.
        return [] if self.editable_mode else self._written


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
