"""Benchmarks: each module is named after what it measures (``bench.compression`` measures
``compression``, ``bench.routing`` the router's ``model="auto"``, ...) and writes JSON plus a Markdown
table under ``docs/bench/``. They use the science packages, ``cluster`` and ``serve_app``; never
``train_jobs`` or ``cli`` (``tests/test_layers.py``)."""
