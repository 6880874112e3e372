"""The enforcer's resolved configuration (flags and env vars land here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.common.settings import Address
from agents.gpu_enforcer.policy import PolicyConfig

ACTIONS = ("kill", "evict", "observe")


@dataclass(frozen=True)
class EnforcerConfig:
    """Every field has a default an operator can run with."""

    interval: float = 5.0
    """Seconds between samples. NVML answers in milliseconds; a pod that
    overruns needs seconds to hurt its neighbours, and the hold counts in
    samples."""

    once: bool = False
    """One sample, the local debug table on stdout, then exit."""

    dry_run: bool = False
    """Decide and report; never signal or evict."""

    action: str = "kill"
    """kill: SIGTERM through a pidfd, SIGKILL after `grace`; evict: the Eviction
    API (respects PodDisruptionBudgets); observe: Events, logs and metrics only."""

    grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL; a notebook kernel saves state in it."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Hold, ceiling and pressure-aware mode (policy.py)."""

    replicas: int | None = None
    """Time-slicing replicas per card for the agreed share; None: from the
    device-plugin config file, else the node label nvidia.com/gpu.replicas."""

    peer_schedulers: tuple[str, ...] = ()
    """Peer schedulers running in the cluster ("hami", "gpushare"): their
    quantities (`nvidia.com/gpumem`, `aliyun.com/gpu-mem`) become the admin's
    limit, since that scheduler placed the pod by them. Undeclared, they are
    the pod's own word and may only lower its limit."""

    soft_fraction: float = 0.9
    """Soft limit (warning Event) as a fraction of the hard limit."""

    host_limit: int | None = None
    """Bytes a process outside any pod may use per GPU; None: host processes
    are ignored (the default: they are the node's own)."""

    limits_file: str = ""
    """Local mode: `{"default": "<quantity>", "pods": {"<pod-uid>": "<quantity>"}}`."""

    device_plugin_config: str = ""
    """The NVIDIA device plugin's config file, for time-slicing replicas."""

    proc_root: str = "/proc"
    """procfs of the host PID namespace (the DaemonSet runs with hostPID)."""

    metrics_address: Address | None = None
    log_level: str = "info"
    log_format: str = "text"

    node_name: str = ""
    """This node (downward API spec.nodeName): the pods watched, Events' host."""

    kubeconfig: str = ""
    """Explicit kubeconfig; empty: in-cluster, else $KUBECONFIG, else local mode."""
