"""Offline reports, no Flower: finding runs, the per-run table, the multi-run and arrival reports,
their statistics and figures.

    python -m meduniverse_flwr.report RUN_DIR [...]            (``multi``)
    python -m meduniverse_flwr.report.arrival RUN_DIR [...]    (``arrival``)
"""
