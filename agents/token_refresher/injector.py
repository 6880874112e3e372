"""The injector: one per node, keeps token files in the containers of its pods.

It watches the pods bound to its node (field selector spec.nodeName) and,
per namespace where those pods ask for tokens, the token Secrets there
(`<prefix>/is-token: "true"`; others are dropped on arrival). A change of
either marks the pods concerned; the next pass, right away, renders their
files and writes the ones that changed. A full pass every `interval`
re-checks every file (a container may have deleted its copy). A Secret
refresh therefore costs the injector no API call: the watch delivers it.

A file is written into a container from the node, with no pods/exec:
- the container ID comes from the pod's status; a process of that container
  is found through `/proc/<pid>/cgroup` (agents/common/attribution.py), one
  scan of /proc for every container not seen before;
- its root is opened through `/proc/<pid>/root` and the PID is checked again
  afterwards: if the process exited and its PID was reused, the check fails
  and nothing is written;
- the file is written under that root by `inject.write_file`: symlink-safe,
  atomic, and left alone when content, mode and owner are already right.
A restarted container has a new container ID: its file is written again.

What cannot be done (a malformed annotation, a missing Secret or container,
a bad template, a read-only or hostile filesystem) is logged, counted and
reported once as a Warning Event on the pod, until it changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agents.common.attribution import (
    AttributionError,
    ProcessGone,
    bare_container_id,
    processes_of_containers,
    read_cgroup,
)
from agents.common.kube import EventRecorder, ObjectRef
from agents.common.watchcache import NodePodCache, WatchCache
from agents.token_refresher.config import InjectorConfig
from agents.token_refresher.inject import (
    InjectError,
    container_root,
    open_root,
    write_file,
)
from agents.token_refresher.metrics import InjectorMetrics
from agents.token_refresher.oauth import Token, TokenFormatError
from agents.token_refresher.spec import (
    Injection,
    SpecError,
    is_token_secret,
    parse_to_inject,
    parse_token_secret,
    render,
    template_of,
)

log = logging.getLogger(__name__)

COMPONENT = "token-refresher-injector"
NOT_FOUND = 404
_DONE_PHASES = ("Succeeded", "Failed")
# A full pass is due this share of `interval` after the last one (see tick()).
FULL_PASS_DUE = 0.85
# Seconds a running container may show no process before that is reported: the
# kubelet notices an exit within a PLEG relist (1 s) and then updates the status.
NO_PROCESS_GRACE = 10.0


@dataclass(frozen=True)
class Target:
    """One file in one container of one pod."""

    pod_uid: str
    namespace: str
    pod_name: str
    injection: Injection

    @property
    def key(self) -> tuple[str, str]:
        """The file within its pod: (container, path)."""
        return (self.injection.container, self.injection.path)

    @property
    def where(self) -> str:
        i = self.injection
        return f"{self.namespace}/{self.pod_name} container {i.container} {i.path}"

    @property
    def pod_ref(self) -> ObjectRef:
        return ObjectRef("Pod", self.pod_name, self.namespace, self.pod_uid)


class _Problem(Exception):
    """A file that cannot be written now; `reason` is the metric label."""

    def __init__(self, reason: str, message: str, *, waiting: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.waiting = waiting
        """Not an error: the container or the Secret is not there *yet*."""


@dataclass(frozen=True)
class _Job:
    target: Target
    container_id: str
    content: bytes
    digest: bytes


@dataclass
class _FileState:
    container_id: str = ""
    digest: bytes = b""
    """Content last written (or found right) in that container."""
    problem: str = ""
    """The reason and message last reported, so each is reported once."""
    state: str = "waiting"
    unseen: tuple[str, float] = ("", 0.0)
    """(container ID, since when) its processes were not found: the pod status
    may say running for a while after the container exited. Reported only if
    that lasts NO_PROCESS_GRACE."""


class Injector:
    """Keeps token files in this node's containers; `tick()` is one pass."""

    def __init__(
        self,
        api_client: Any,
        config: InjectorConfig,
        *,
        metrics: InjectorMetrics,
        recorder: EventRecorder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        self.config = config
        self.api_client = api_client
        self._core: Any = client.CoreV1Api(api_client)
        self._metrics = metrics
        self._recorder = recorder
        self._clock = clock
        self.pods = NodePodCache(api_client, config.node_name, on_change=self._pod_changed)
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._secrets: dict[str, WatchCache] = {}  # namespace -> its token Secrets
        self._dirty: set[str] = set()  # pod UIDs to look at in the next pass
        self._users: dict[tuple[str, str], set[str]] = {}  # (ns, Secret) -> pod UIDs
        self._uses: dict[str, set[tuple[str, str]]] = {}  # pod UID -> its (ns, Secret)s
        # pod UID -> (container, path) -> state: per pod, so that a pass costs
        # O(files), not O(pods x files).
        self._files: dict[str, dict[tuple[str, str], _FileState]] = {}
        self._pod_problems: dict[str, str] = {}  # pod UID -> annotation problem reported
        self._pids: dict[str, int] = {}  # bare container ID -> a PID in it
        self._templates: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._last_full = -float("inf")
        self._watch_counts: dict[int, tuple[int, int]] = {}
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="inject")
        # Events are posted by one thread of their own, in order: 500 new
        # containers must not hold a Secret update back for 500 POSTs.
        self._events = ThreadPoolExecutor(1, thread_name_prefix="events")

    # -- life cycle

    def start(self) -> Injector:
        self.pods.start()
        return self

    def stop(self) -> None:
        self.pods.stop()
        with self._lock:
            caches = list(self._secrets.values())
            self._secrets.clear()
        for cache in caches:
            cache.stop()
        self._pool.shutdown(wait=True)
        # Events still queued are dropped: a stopping agent must not wait on an API.
        self._events.shutdown(wait=True, cancel_futures=True)

    def flush_events(self, timeout: float = 30.0) -> None:
        """Wait (up to `timeout`) until the Events queued so far are posted."""
        try:
            self._events.submit(lambda: None).result(timeout)
        except TimeoutError:
            log.warning("Events still queued after %.0f s; dropping them", timeout)

    # -- watch callbacks (watch threads): mark, wake, return

    def _pod_changed(self, type_: str, pod: dict[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid", "")
        with self._lock:
            self._dirty.add(uid)
        self.wake.set()

    def _secret_changed(self, type_: str, secret: dict[str, Any]) -> None:
        meta = secret.get("metadata") or {}
        with self._lock:
            users = self._users.get((meta.get("namespace", ""), meta.get("name", "")), set())
            self._dirty |= users
        if users:
            self.wake.set()

    # -- one pass

    def tick(self) -> None:
        self._count_watches()
        if not self.pods.synced:
            log.debug("waiting for the first list of this node's pods")
            return
        started = time.monotonic()
        # The loop's ticks come up to 10% early (its jitter): such a tick counts,
        # or a full pass would come only every other tick, near 2 x interval.
        full = started - self._last_full >= FULL_PASS_DUE * self.config.interval
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        pods = self.pods.by_uid()
        if full:
            self._last_full = started
            self._templates.clear()  # templates are re-read once per full pass
            dirty = set(pods) | set(self._pod_problems) | set(self._files)
        jobs: list[_Job] = []
        for uid in dirty:
            jobs.extend(self._plan_pod(uid, pods.get(uid), full))
        if full:
            self._forget_exited_containers(jobs)
        self._forget_unused_namespaces()
        self._run(jobs)
        self._export_states()
        if jobs or full:
            self._metrics.write_seconds.set(time.monotonic() - started)

    def _plan_pod(self, uid: str, pod: dict[str, Any] | None, full: bool) -> list[_Job]:
        """The writes this pod needs now; problems are reported here."""
        phase = ((pod or {}).get("status") or {}).get("phase")
        if pod is None or phase in _DONE_PHASES:
            self._forget_pod(uid)
            return []
        meta = pod.get("metadata") or {}
        try:
            injections = parse_to_inject(meta.get("annotations"))
        except SpecError as err:
            self._forget_pod(uid, keep_problem=True)
            self._annotation_problem(pod, str(err))
            return []
        namespace = meta.get("namespace", "")
        if self._pod_problems.pop(uid, None) is not None:
            log.info("pod %s/%s: to-inject is usable again", namespace, meta.get("name"))
        targets = [Target(uid, namespace, meta.get("name", ""), i) for i in injections]
        self._set_users(uid, namespace, {t.injection.secret_name for t in targets})
        if not targets:
            self._files.pop(uid, None)
            return []
        files = self._files.setdefault(uid, {})
        wanted = {t.key for t in targets}
        for key in [k for k in files if k not in wanted]:
            del files[key]
        jobs = []
        for target in targets:
            state = files.setdefault(target.key, _FileState())
            try:
                job = self._plan(target, pod)
            except _Problem as problem:
                self._problem(target, state, problem)
                continue
            if not full and job.digest == state.digest and job.container_id == state.container_id:
                continue  # written already, and nothing changed since
            jobs.append(job)
        return jobs

    def _plan(self, target: Target, pod: dict[str, Any]) -> _Job:
        injection = target.injection
        container_id = _container_id(pod, injection.container)
        cache = self._secret_cache(target.namespace)
        if not cache.synced:
            raise _Problem("no_secret", "the token Secrets are not listed yet", waiting=True)
        secret = cache.named(target.namespace, injection.secret_name)
        if secret is None:
            selector = self.config.secret_selector
            raise _Problem(
                "no_secret",
                f"no token Secret {injection.secret_name} in namespace {target.namespace} "
                '(a Secret annotated is-token: "true"'
                + (f" with labels {selector}" if selector else "")
                + ")",
            )
        try:
            token_json = parse_token_secret(secret).token_json
            token = Token.from_json(token_json, self._clock())
        except (SpecError, TokenFormatError) as err:
            raise _Problem("bad_secret", f"token Secret {injection.secret_name}: {err}") from None
        template = None
        if injection.template_config_map:
            template = self._template(target.namespace, injection.template_config_map)
        try:
            content = render(template, token)
        except SpecError as err:
            raise _Problem("bad_template", str(err)) from None
        header = f"{injection.mode}:{injection.owner}:{injection.group}:".encode()
        return _Job(target, container_id, content, hashlib.sha256(header + content).digest())

    def _template(self, namespace: str, name: str) -> str:
        key = (namespace, name)
        if key not in self._templates:
            self._metrics.api_call("get", "configmaps")
            try:
                response = self._core.read_namespaced_config_map(
                    name, namespace, _preload_content=False, _request_timeout=10
                )
                self._templates[key] = json.loads(response.data)
            except Exception as err:
                if getattr(err, "status", None) != NOT_FOUND:
                    raise _Problem(
                        "bad_template", f"cannot read template ConfigMap {name}: {_short(err)}"
                    ) from None
                self._templates[key] = None
        try:
            return template_of(self._templates[key], name)
        except SpecError as err:
            raise _Problem("bad_template", str(err)) from None

    # -- writing (a thread pool: fsync and the /proc walk dominate)

    def _run(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        unknown = {
            bare_container_id(j.container_id)
            for j in jobs
            if bare_container_id(j.container_id) not in self._pids
        }
        self._find_pids(unknown)
        results = list(self._pool.map(self._write, jobs))
        for job, outcome in zip(jobs, results, strict=True):
            state = self._files.get(job.target.pod_uid, {}).get(job.target.key)
            if state is None:
                continue  # the pod went away meanwhile
            if isinstance(outcome, _Problem):
                if outcome.reason == "no_process":
                    now = time.monotonic()
                    if state.unseen[0] != job.container_id:
                        state.unseen = (job.container_id, now)
                    if now - state.unseen[1] < NO_PROCESS_GRACE:
                        outcome.waiting = True
                self._problem(job.target, state, outcome)
                continue
            state.unseen = ("", 0.0)
            first = state.container_id != job.container_id
            state.container_id, state.digest, state.state = job.container_id, job.digest, "ok"
            if state.problem:
                log.info("%s: written again", job.target.where)
                state.problem = ""
            if outcome:
                self._metrics.files_written.inc()
                if first:
                    injection = job.target.injection
                    self._event(
                        job.target.pod_ref,
                        "Normal",
                        "TokenInjected",
                        f"token from Secret {injection.secret_name} written to "
                        f"{injection.path} in container {injection.container}",
                    )

    def _write(self, job: _Job) -> bool | _Problem:
        """Write one file; True when written, False when it was already right."""
        injection = job.target.injection
        if self.config.dry_run:
            log.info("dry run: would write %s", job.target.where)
            return False
        bare = bare_container_id(job.container_id)
        for attempt in range(2):
            if attempt:
                # The PID we knew is gone or someone else's now: look again.
                self._find_pids({bare})
            pid = self._pids.get(bare)
            if pid is None:
                # _run scanned /proc for it at the start of this pass.
                return _Problem(
                    "no_process", f"no process of container {injection.container} on this node"
                )
            try:
                rootfd = open_root(container_root(pid, self.config.proc_root))
            except InjectError:
                self._pids.pop(bare, None)
                continue
            try:
                # Checked after opening: a PID reused meanwhile shows another cgroup.
                if not _in_container(pid, bare, self.config.proc_root):
                    self._pids.pop(bare, None)
                    continue
                result = write_file(
                    rootfd,
                    injection.path,
                    job.content,
                    mode=injection.mode,
                    uid=injection.owner,
                    gid=injection.group,
                )
                return result.written
            except InjectError as err:
                return _Problem(err.reason, str(err))
            finally:
                os.close(rootfd)
        return _Problem(
            "no_process", f"no live process of container {injection.container} on this node"
        )

    def _find_pids(self, wanted: set[str]) -> None:
        if not wanted:
            return
        found = processes_of_containers(wanted, self.config.proc_root)
        for container_id, pids in found.items():
            self._pids[container_id] = pids[0]

    # -- bookkeeping

    def _secret_cache(self, namespace: str) -> WatchCache:
        with self._lock:
            cache = self._secrets.get(namespace)
            if cache is None:
                cache = WatchCache(
                    self.api_client,
                    "secrets",
                    namespace=namespace,
                    label_selector=self.config.secret_selector,
                    keep=is_token_secret,
                    on_change=self._secret_changed,
                )
                self._secrets[namespace] = cache
                cache.start()
        # A first pass waits briefly rather than reporting every file as waiting.
        cache.wait_synced(2.0)
        return cache

    def _set_users(self, uid: str, namespace: str, secrets: Iterable[str]) -> None:
        uses = {(namespace, name) for name in secrets}
        with self._lock:
            for key in self._uses.pop(uid, set()) - uses:
                self._users.get(key, set()).discard(uid)
            for key in uses:
                self._users.setdefault(key, set()).add(uid)
            if uses:
                self._uses[uid] = uses

    def _forget_pod(self, uid: str, *, keep_problem: bool = False) -> None:
        self._set_users(uid, "", ())
        self._files.pop(uid, None)
        if not keep_problem:
            self._pod_problems.pop(uid, None)

    def _forget_exited_containers(self, jobs: list[_Job]) -> None:
        """Keep the PIDs of the containers a full pass still writes to, only.

        Every restart brings a new container ID: without this the map grows
        for as long as the node runs.
        """
        wanted = {bare_container_id(job.container_id) for job in jobs}
        self._pids = {cid: pid for cid, pid in self._pids.items() if cid in wanted}

    def _forget_unused_namespaces(self) -> None:
        with self._lock:
            for key in [k for k, users in self._users.items() if not users]:
                del self._users[key]
            used = {namespace for namespace, _ in self._users}
            unused = [ns for ns in self._secrets if ns not in used]
            caches = [self._secrets.pop(ns) for ns in unused]
        for cache in caches:
            self._count_cache(cache)
            cache.stop()
            # id() values are reused once the cache is freed: never let a new
            # cache inherit this one's counts.
            self._watch_counts.pop(id(cache), None)

    # -- reporting

    def _problem(self, target: Target, state: _FileState, problem: _Problem) -> None:
        state.state = "waiting" if problem.waiting else "failing"
        said = f"{problem.reason}: {problem}"
        if problem.waiting or said == state.problem:
            return
        state.problem = said
        self._metrics.injection_failures.labels(problem.reason).inc()
        log.warning("%s: cannot write the token file: %s", target.where, problem)
        injection = target.injection
        self._event(
            target.pod_ref,
            "Warning",
            "TokenInjectionFailed",
            f"{injection.path} in container {injection.container}: {problem}",
        )

    def _annotation_problem(self, pod: dict[str, Any], message: str) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        if self._pod_problems.get(uid) == message:
            return
        self._pod_problems[uid] = message
        self._metrics.injection_failures.labels("bad_annotation").inc()
        log.warning("pod %s/%s: %s", meta.get("namespace"), meta.get("name"), message)
        self._event(
            ObjectRef("Pod", meta.get("name", ""), meta.get("namespace", ""), uid),
            "Warning",
            "InvalidTokenAnnotation",
            message,
        )

    def _event(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        if self._recorder is None or self.config.dry_run:
            return
        self._metrics.api_call("create", "events")
        self._events.submit(self._recorder.emit, ref, type_, reason, message)

    def _export_states(self) -> None:
        counts = {"ok": 0, "failing": 0, "waiting": 0}
        for files in self._files.values():
            for state in files.values():
                counts[state.state] += 1
        for name, count in counts.items():
            self._metrics.files.labels(name).set(count)

    def _count_watches(self) -> None:
        with self._lock:
            caches: list[WatchCache] = [self.pods, *self._secrets.values()]
        for cache in caches:
            self._count_cache(cache)

    def _count_cache(self, cache: WatchCache) -> None:
        lists, watches = cache.lists, cache.watches
        seen_lists, seen_watches = self._watch_counts.get(id(cache), (0, 0))
        if lists > seen_lists:
            self._metrics.api_calls.labels("list", cache.resource).inc(lists - seen_lists)
        if watches > seen_watches:
            self._metrics.api_calls.labels("watch", cache.resource).inc(watches - seen_watches)
        self._watch_counts[id(cache)] = (lists, watches)


def _container_id(pod: dict[str, Any], name: str) -> str:
    """The running container's ID from the pod status; _Problem when there is none."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    declared = {
        c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])
    }
    if name not in declared:
        raise _Problem("no_container", f"the pod has no container named {name!r}")
    for entry in (status.get("containerStatuses") or []) + (
        status.get("initContainerStatuses") or []
    ):
        if entry.get("name") == name:
            container_id = entry.get("containerID") or ""
            if "running" in (entry.get("state") or {}) and bare_container_id_or_none(container_id):
                return str(container_id)
            break
    raise _Problem("not_running", f"container {name} is not running", waiting=True)


def bare_container_id_or_none(container_id: str) -> str | None:
    try:
        return bare_container_id(container_id)
    except ValueError:
        return None


def _in_container(pid: int, container_id: str, proc_root: str) -> bool:
    try:
        ref = read_cgroup(pid, proc_root)
    except (ProcessGone, AttributionError):
        return False
    return ref is not None and ref.container_id == container_id


def _short(err: BaseException) -> str:
    """One line for an Event: str() of an ApiException spans lines, headers and body."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(err, 'reason', '') or ''}".strip()
    return " ".join(str(err).split())[:300] or type(err).__name__
