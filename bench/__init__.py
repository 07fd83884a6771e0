"""The benchmarks (`bench/ingest.py`, `bench/labeling.py`) and what they share (`bench.common`).

A regular package, so that `bench.common` imports the same way however a script is started.
"""
