"""GPU memory enforcer for time-sliced NVIDIA cards (issue 3; not built yet).

The package exists so that the import-boundary contracts in pyproject.toml
cover every agent from the start.
"""
