"""The library every agent is built on: settings, logging, run loop, HTTP
endpoints, metrics and the optional Kubernetes client.

It imports no agent (enforced by import-linter, see pyproject.toml).
"""
