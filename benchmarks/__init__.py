"""The benchmark suite moved into the package: ``tq_loader.bench`` (``tq-loader bench``, ``make bench``).

``python -m benchmarks.run`` still runs it from the repository root. What stays here: ``backends.py``
(the storage backends' own-client baselines) and the few timing helpers it uses (``harness.py``).
"""
