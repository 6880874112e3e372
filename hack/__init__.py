"""Developer tools: the demo, benchmarks and the builders of test worlds.

Run them from the repository root as modules (`python -m hack.bench_sweep`);
the tests import the world builders from here too.
"""
