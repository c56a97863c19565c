"""The application on top of the library: the ``tq-loader`` CLI, the GRPO demo, the status view.

Nothing in the library (``tq_loader.*`` outside this package) imports from here; the app imports
the library. The console script ``tq-loader`` and ``python -m tq_loader`` run :func:`tq_loader.app.cli.main`.
"""
