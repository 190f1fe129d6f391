"""Benchmarks of bob_jax: model throughput / compile time / FLOPs / MFU / memory against timm, the data
pipeline and checkpoint conversion. Run `python -m bob_jax.bench --help`.

Submodules: `models` (JAX forward and train step), `timm_ref` (torch/timm, imported lazily), `flops`
(analytic and XLA FLOP counts), `data` (input pipeline), `convert` (conversion time), `report`
(console table, bench.json, bench.md). Importing this package imports nothing heavy.
"""
