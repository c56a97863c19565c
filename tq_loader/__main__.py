"""``python -m tq_loader``: the ``tq-loader`` command line (:mod:`tq_loader.app.cli`)."""

from __future__ import annotations

import sys

from tq_loader.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
