"""``python -m benchmarks.run ARGS`` = ``tq-loader bench ARGS`` (the suite lives in ``tq_loader.bench``)."""

import sys

from tq_loader.bench import main

if __name__ == "__main__":
    sys.exit(main())
