"""The pipeline app's Hydra YAML (package data, so ``tq-loader demo sampler=...`` works from a wheel)."""
