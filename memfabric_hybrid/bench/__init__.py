"""Benchmarks: ``python -m memfabric_hybrid.bench {store,te}``.

Each prints a table (and ``--json FILE`` writes the figures) and runs the same workload on the
peers installed from PyPI in the same run, with ratios. Peers that are not installed are
reported as skipped with the command that installs them (``scripts/bench.sh`` does it all).
"""
