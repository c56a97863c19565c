"""``python -m tq_loader.bench [--quick] ...``: the same as ``tq-loader bench``."""

import sys

from tq_loader.bench import main

sys.exit(main())
