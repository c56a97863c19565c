"""Benchmarks of tq_loader against baselines measured in the same run (``make bench``).

The machine these run on is small and shared, so every speed is reported as a *ratio* to a
baseline timed minutes earlier in the same process, from medians of a few repetitions -- never
as an absolute number to compare across runs. ``python -m benchmarks.run --quick`` is a smoke run.
"""
