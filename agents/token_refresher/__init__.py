"""OAuth2 token refresher: controller and node injector (issue 4; not built yet).

The package exists so that the import-boundary contracts in pyproject.toml
cover every agent from the start.
"""
