"""The TransferQueue compatibility harness (``make compat``): TransferQueue 0.1.11's own tutorials and
public-API tests, taken from its wheel in ``.venv-tq/``, run against tq_loader through the
``transfer_queue`` alias (tq_loader.compat). See compat/run.py; exclusions are in compat/excluded.toml.
"""
