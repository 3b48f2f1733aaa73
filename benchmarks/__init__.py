"""tfweave's benchmarks: one module per part, all on the harness in ``harness.py``."""
