"""Node agents for Kubernetes clusters that share expensive hardware."""

from importlib import metadata

try:
    __version__ = metadata.version("node-agents")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
