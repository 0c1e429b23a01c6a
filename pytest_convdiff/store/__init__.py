"""Everything a run keeps on disk: cache entries, golden references, baselines.

Cache entries (``cache``) and golden references (``reference``) are read through one interface,
``entry.Entry``, as a ``run.ModelRun``; every file is written through ``atomic``. The package sits
below the runner and the pipeline: it imports ``core`` and ``errors`` only, so
serving a reference needs neither (tests/unit/store/test_store.py checks the import graph).
"""
