"""Benchmarks of the diffusion_policy package. Each script runs as a module from the repository root,
e.g. ``python -m benchmarks.run --quick``; see benchmarks/README.md for what each one measures."""
