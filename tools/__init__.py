"""Benchmarks, the memory plan and the logits check against transformers, each run from the
repository root as `python -m tools.NAME` (tools/gpu_bench.sh runs the GPU benchmarks)."""
