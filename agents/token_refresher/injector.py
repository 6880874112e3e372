"""The injector: one per node, keeps token files in the containers of its pods.

It watches the pods bound to its node (field selector spec.nodeName) and
takes the files' contents from the controller (fileclient.py): one stream to
a controller replica that renders, for the pods this node claims, each
file's content, mode and owner, or the problem that prevents it. This node
reads no Secret and no template ConfigMap. A pod change marks that pod; a
snapshot from the controller marks the pods it lists; the next pass, right
away, writes the files that changed. A full pass every `interval` re-checks
every file (a container may have deleted its copy).

A file is written into a container from the node, with no pods/exec:
- the container ID comes from the pod's status; a process of that container
  is found through `/proc/<pid>/cgroup` (agents/common/attribution.py), one
  scan of /proc for every container not seen before;
- its root is opened through `/proc/<pid>/root` and the PID is checked again
  afterwards: if the process exited and its PID was reused, the check fails
  and nothing is written;
- the file is written under that root by `inject.write_file`: symlink-safe,
  atomic, and left alone when content, mode and owner are already right;
  confined, as a tenant's: with the owner's rights, never over another
  uid's file, never into a FUSE or network filesystem;
- only paths under `--allowed-path-prefixes` (default `/tmp/`) are written;
- each write has a deadline (`--write-timeout`) that does not depend on the
  kernel answering: a write stuck past it is reported and its thread left
  behind (`_Writers`), so a hung filesystem holds that file only.
A restarted container has a new container ID: its file is written again from
the files kept, at once, without waiting for the controller.

Files the controller no longer lists for a pod (its annotation changed) and
the files of a controller that cannot be reached are left in place: the
container keeps its last token until that expires, and deleting a credential
under a running job could break it for nothing.

What cannot be done (a malformed annotation, a missing Secret or container,
a bad template: the controller says so; a read-only or hostile filesystem;
an unexpected exception, reason `internal`) is logged, counted and reported
once as a Warning Event on the pod, until it changes: it fails that file (or
pod), never the pass.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agents.common.attribution import (
    AttributionError,
    ProcessGone,
    bare_container_id,
    processes_of_containers,
    read_cgroup,
)
from agents.common.kube import EventRecorder, ObjectRef
from agents.common.watchcache import NodePodCache
from agents.token_refresher.config import InjectorConfig
from agents.token_refresher.fileclient import (
    CaBundle,
    CaConfigMap,
    CaFile,
    DeliveredFile,
    DeliveredPod,
    FileClient,
    claims_of,
)
from agents.token_refresher.inject import (
    Confined,
    CredentialsNotRestored,
    InjectError,
    container_root,
    normal_path,
    open_root,
    path_allowed,
    write_file,
)
from agents.token_refresher.metrics import InjectorMetrics
from agents.token_refresher.spec import Injection

log = logging.getLogger(__name__)

COMPONENT = "token-refresher-injector"
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

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        waiting: bool = False,
        failure: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.waiting = waiting
        """Not an error: the container or the Secret is not there *yet*."""
        self.failure = failure
        """The unexpected exception behind an `internal` problem (logged with its traceback)."""


def _internal(what: str, failure: BaseException) -> _Problem:
    """An unexpected exception, as one file's (or pod's) problem: never the pass's.
    The message names only its type; the log has the traceback."""
    return _Problem(
        "internal",
        f"internal error while {what} ({type(failure).__name__}); see the injector's log",
        failure=failure,
    )


def _injection(file: DeliveredFile) -> Injection:
    return Injection(
        secret_name=file.secret,
        container=file.container,
        owner=file.owner,
        group=file.group,
        path=file.path,
        mode=file.mode,
    )


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


@dataclass(eq=False)
class _Task:
    job: _Job
    future: Future[bool | _Problem] = field(default_factory=Future)
    started: float | None = None
    """When a thread took it (monotonic); its deadline counts from here."""
    thread: threading.Thread | None = None


class _Writers:
    """Threads that write the files, each write with a deadline the kernel cannot hold up.

    A thread blocked in a syscall cannot be interrupted from Python (a lookup
    on overlayfs over a stopped FUSE daemon waits in the kernel, unkillable).
    So a write past its deadline is reported, its thread left to the kernel,
    and a new thread takes its place while at most `max_stuck` are left
    behind; beyond, the pool shrinks. A thread that comes back rejoins the
    pool if it is short, and otherwise ends. Until then its container gets
    no other write (`held`): one hung filesystem holds one thread, not one
    per pass.
    """

    def __init__(self, size: int, max_stuck: int, write: Callable[[_Job], bool | _Problem]) -> None:
        self._size = size
        self._max_stuck = max_stuck
        self._write = write
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[threading.Thread] = set()
        self._stuck: dict[threading.Thread, str] = {}  # thread -> container ID it writes to
        self._closed = False
        self._started = 0
        for _ in range(size):
            self._spawn()

    @property
    def stuck(self) -> int:
        with self._lock:
            return len(self._stuck)

    def held(self) -> set[str]:
        """Container IDs with a write still stuck in the kernel."""
        with self._lock:
            return set(self._stuck.values())

    def _spawn(self) -> None:
        self._started += 1
        thread = threading.Thread(target=self._serve, name=f"inject-{self._started}", daemon=True)
        self._live.add(thread)
        thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            task = self._queue.get()
            if task is None:
                with self._lock:
                    self._live.discard(me)
                return
            if not task.future.set_running_or_notify_cancel():
                continue  # given up on before it started
            with self._lock:
                task.started, task.thread = time.monotonic(), me
            retire = False
            try:
                outcome = self._write(task.job)
            except CredentialsNotRestored as err:
                # This thread's credentials are not root's any more: never reuse it.
                outcome, retire = _internal("restoring the write thread's rights", err), True
            except Exception as err:
                outcome = _internal("writing the file", err)
            task.future.set_result(outcome)
            with self._lock:
                if me in self._stuck:  # back after its deadline
                    del self._stuck[me]
                    if self._closed or retire or len(self._live) >= self._size:
                        return
                    self._live.add(me)
                elif retire:
                    self._live.discard(me)
                    if not self._closed:
                        self._spawn()
                    return

    def run(self, jobs: list[_Job], timeout: float) -> list[bool | _Problem]:
        """Each job's outcome; a job not done `timeout` seconds after it started is a
        `write_timeout` problem, and its thread is left behind."""
        tasks = [_Task(job) for job in jobs]
        for task in tasks:
            self._queue.put(task)
        outcomes: dict[int, bool | _Problem] = {}
        pending = set(range(len(tasks)))
        while pending:
            now = time.monotonic()
            nearest = 0.1
            with self._lock:
                for index in list(pending):
                    task = tasks[index]
                    if task.future.done():
                        outcomes[index] = task.future.result()
                        pending.discard(index)
                    elif task.started is not None and now - task.started >= timeout:
                        outcomes[index] = self._abandon(task, timeout)
                        pending.discard(index)
                    elif task.started is not None:
                        nearest = min(nearest, task.started + timeout - now)
                if pending and not self._live:
                    for index in list(pending):
                        if tasks[index].future.cancel():
                            outcomes[index] = _Problem(
                                "write_timeout",
                                f"not written: all write threads are stuck in the kernel "
                                f"({len(self._stuck)}, the injector's --max-stuck-writes "
                                f"is {self._max_stuck})",
                            )
                            pending.discard(index)
            if pending:
                futures = [tasks[index].future for index in pending]
                concurrent.futures.wait(
                    futures,
                    timeout=max(nearest, 0.001),
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
        return [outcomes[index] for index in range(len(tasks))]

    def _abandon(self, task: _Task, timeout: float) -> _Problem:
        """Under the lock: leave the task's thread to the kernel, replace it if allowed."""
        thread = task.thread
        assert thread is not None
        self._live.discard(thread)
        self._stuck[thread] = task.job.container_id
        if len(self._stuck) <= self._max_stuck and not self._closed:
            self._spawn()
        log.error(
            "%s: the write did not finish within %g s; thread %s left blocked in the kernel "
            "(%d stuck, limit %d)",
            task.job.target.where,
            timeout,
            thread.name,
            len(self._stuck),
            self._max_stuck,
        )
        return _Problem(
            "write_timeout",
            f"the write did not finish within {timeout:g} s (the injector's --write-timeout); "
            "its filesystem does not answer. This container gets no other write until it does",
        )

    def close(self, timeout: float) -> None:
        """End the threads that are not stuck (waiting up to `timeout` for each)."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for _ in live:
            self._queue.put(None)
        for thread in live:
            thread.join(timeout)


class Injector:
    """Keeps token files in this node's containers; `tick()` is one pass."""

    def __init__(
        self,
        api_client: Any,
        config: InjectorConfig,
        *,
        metrics: InjectorMetrics,
        recorder: EventRecorder | None = None,
        ca: CaBundle | None = None,
        files: Callable[..., FileClient] = FileClient,
    ) -> None:
        """`ca`: the controller's CA bundle (default: --ca-file, else the CA ConfigMap);
        `files` makes the file stream client (tests pass one with their resolver)."""
        self.config = config
        self.api_client = api_client
        self._metrics = metrics
        self._recorder = recorder
        self.pods = NodePodCache(api_client, config.node_name, on_change=self._pod_changed)
        link = config.controller
        if ca is None:
            ca = (
                CaFile(link.ca_file)
                if link.ca_file
                else CaConfigMap(
                    api_client, link.namespace, link.ca_configmap, on_api_call=metrics.api_call
                )
            )
        self.files = files(
            link,
            config.node_name,
            claims=lambda: claims_of(self.pods.objects()),
            ca=ca,
            metrics=metrics,
            on_files=self._files_changed,
        )
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # pod UIDs to look at in the next pass
        self._delivered = False  # new files from the controller since the last pass
        # What the last pass was given per pod, to plan only the pods that changed.
        self._seen_delivered: dict[str, DeliveredPod] = {}
        # pod UID -> (container, path) -> state: per pod, so that a pass costs
        # O(files), not O(pods x files).
        self._files: dict[str, dict[tuple[str, str], _FileState]] = {}
        self._pod_problems: dict[str, str] = {}  # pod UID -> annotation problem reported
        self._pids: dict[str, int] = {}  # bare container ID -> a PID in it
        self._last_full = -float("inf")
        self._watch_counts: tuple[int, int] = (0, 0)
        self._writers = _Writers(config.workers, config.max_stuck_writes, self._write)
        # Events are posted by one thread of their own, in order: 500 new
        # containers must not hold a token update back for 500 POSTs.
        self._events = ThreadPoolExecutor(1, thread_name_prefix="events")

    # -- life cycle

    def start(self) -> Injector:
        self.pods.start()
        self.files.start()
        return self

    def stop(self) -> None:
        self.files.stop()
        self.pods.stop()
        # Stuck writers are left to the kernel (daemon threads): they hold nothing.
        self._writers.close(timeout=self.config.write_timeout)
        # Events still queued are dropped: a stopping agent must not wait on an API.
        self._events.shutdown(wait=True, cancel_futures=True)

    def flush_events(self, timeout: float = 30.0) -> None:
        """Wait (up to `timeout`) until the Events queued so far are posted."""
        try:
            self._events.submit(lambda: None).result(timeout)
        except TimeoutError:
            log.warning("Events still queued after %.0f s; dropping them", timeout)

    def ready(self) -> tuple[bool, str]:
        """Ready once this node's pods are listed and, with pods to serve, while the
        controller's files are current (fileclient.FileClient.ready)."""
        if not self.pods.synced:
            return False, "this node's pods are not listed yet"
        stuck = self._writers.stuck
        if stuck >= self.config.max_stuck_writes:
            return False, (
                f"{stuck} write threads are stuck in the kernel (--max-stuck-writes "
                f"{self.config.max_stuck_writes}): filesystems that do not answer"
            )
        return self.files.ready()

    # -- callbacks (watch and stream threads): mark, wake, return

    def _pod_changed(self, type_: str, pod: dict[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid", "")
        with self._lock:
            self._dirty.add(uid)
        self.files.claims_changed()
        self.wake.set()

    def _files_changed(self) -> None:
        with self._lock:
            self._delivered = True
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
            delivered, self._delivered = self._delivered, False
        pods = self.pods.by_uid()
        snapshot = self.files.files()
        delivered_pods = dict(snapshot.pods) if snapshot is not None else {}
        if delivered:
            # Only the pods whose delivery changed: a snapshot holds the whole
            # node, and one Secret's refresh must not cost a plan of every pod.
            seen = self._seen_delivered
            dirty |= {uid for uid, pod in delivered_pods.items() if seen.get(uid) != pod}
            dirty |= set(seen) - set(delivered_pods)
            self._seen_delivered = delivered_pods
        if full:
            self._last_full = started
            dirty = set(pods) | set(self._pod_problems) | set(self._files)
        jobs: list[_Job] = []
        for uid in dirty:
            try:
                jobs.extend(self._plan_pod(uid, pods.get(uid), delivered_pods.get(uid), full))
            except Exception as err:
                # One pod's surprise is that pod's problem, never the pass's.
                self._pod_failed(uid, pods.get(uid), err)
        if full:
            self._forget_exited_containers(jobs)
        self._run(jobs)
        self._export_states()
        if jobs or full:
            self._metrics.write_seconds.set(time.monotonic() - started)

    def _plan_pod(
        self,
        uid: str,
        pod: dict[str, Any] | None,
        delivered: DeliveredPod | None,
        full: bool,
    ) -> list[_Job]:
        """The writes this pod needs now; problems are reported here."""
        phase = ((pod or {}).get("status") or {}).get("phase")
        if pod is None or phase in _DONE_PHASES or delivered is None:
            # Not (or no longer) served by the controller: what was written stays.
            self._forget_pod(uid)
            return []
        meta = pod.get("metadata") or {}
        if delivered.problem is not None:
            self._forget_pod(uid, keep_problem=True)
            self._annotation_problem(pod, delivered.problem.reason, delivered.problem.message)
            return []
        namespace = meta.get("namespace", "")
        if self._pod_problems.pop(uid, None) is not None:
            log.info("pod %s/%s: to-inject is usable again", namespace, meta.get("name"))
        delivered_files = {file.key: file for file in delivered.files}
        if not delivered_files:
            self._files.pop(uid, None)
            return []
        files = self._files.setdefault(uid, {})
        for key in [k for k in files if k not in delivered_files]:
            del files[key]  # no longer asked for: the file stays where it is
        jobs = []
        for key, file in delivered_files.items():
            target = Target(uid, namespace, meta.get("name", ""), _injection(file))
            state = files.setdefault(key, _FileState())
            try:
                job = self._plan(target, pod, file)
            except _Problem as problem:
                self._problem(target, state, problem)
                continue
            except Exception as err:
                self._problem(target, state, _internal("planning the file", err))
                continue
            if job is None:
                continue  # held: an older token than the one written came in
            if not full and job.digest == state.digest and job.container_id == state.container_id:
                continue  # written already, and nothing changed since
            jobs.append(job)
        return jobs

    def _plan(self, target: Target, pod: dict[str, Any], file: DeliveredFile) -> _Job | None:
        injection = target.injection
        prefixes = self.config.allowed_path_prefixes
        if not path_allowed(injection.path, prefixes):
            raise _Problem(
                "path_not_allowed",
                f"path {normal_path(injection.path)} is outside the directories this node "
                f"allows for token files ({', '.join(prefixes)}: the injector's "
                "--allowed-path-prefixes)",
            )
        # The container first: a file problem waits for a running container, as before.
        container_id = _container_id(pod, injection.container)
        if file.problem is not None:
            raise _Problem(file.problem.reason, file.problem.message, waiting=file.problem.waiting)
        if file.content is None:
            return None
        content = file.content
        header = f"{injection.mode}:{injection.owner}:{injection.group}:".encode()
        return _Job(target, container_id, content, hashlib.sha256(header + content).digest())

    # -- writing (threads with a deadline per write: fsync and the /proc walk dominate)

    def _run(self, jobs: list[_Job]) -> None:
        if jobs:
            held = self._writers.held()
            waiting = [job for job in jobs if job.container_id in held]
            jobs = [job for job in jobs if job.container_id not in held]
            for job in waiting:
                state = self._files.get(job.target.pod_uid, {}).get(job.target.key)
                if state is not None and state.problem.startswith("write_timeout:"):
                    continue  # this file's own write is the stuck one: said already
                self._record(
                    job,
                    _Problem(
                        "write_timeout",
                        f"not written: a write into container {job.target.injection.container} "
                        "is still stuck in the kernel (its filesystem does not answer)",
                    ),
                )
            unknown = {
                bare_container_id(j.container_id)
                for j in jobs
                if bare_container_id(j.container_id) not in self._pids
            }
            self._find_pids(unknown)
            outcomes = self._writers.run(jobs, self.config.write_timeout)
            for job, outcome in zip(jobs, outcomes, strict=True):
                self._record(job, outcome)
        self._metrics.stuck_writes.set(self._writers.stuck)

    def _record(self, job: _Job, outcome: bool | _Problem) -> None:
        state = self._files.get(job.target.pod_uid, {}).get(job.target.key)
        if state is None:
            return  # the pod went away meanwhile
        try:
            self._record_outcome(job, state, outcome)
        except Exception as err:
            self._problem(job.target, state, _internal("recording the write", err))

    def _record_outcome(self, job: _Job, state: _FileState, outcome: bool | _Problem) -> None:
        if isinstance(outcome, _Problem):
            if outcome.reason == "no_process":
                now = time.monotonic()
                if state.unseen[0] != job.container_id:
                    state.unseen = (job.container_id, now)
                if now - state.unseen[1] < NO_PROCESS_GRACE:
                    outcome.waiting = True
            self._problem(job.target, state, outcome)
            return
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
        """Write one file (on a write thread); True when written, False when it was
        already right. Any unexpected exception is that file's problem."""
        try:
            return self._write_one(job)
        except CredentialsNotRestored:
            raise  # the thread retires (_Writers)
        except Exception as err:
            return _internal("writing the file", err)

    def _write_one(self, job: _Job) -> bool | _Problem:
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
                    # The tenant's file: its owner's rights, filesystems that answer.
                    confined=Confined(f"{self.config.proc_root}/{pid}/mountinfo"),
                )
                return result.written
            except CredentialsNotRestored:
                raise
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

    def _forget_pod(self, uid: str, *, keep_problem: bool = False) -> None:
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

    # -- reporting

    def _problem(self, target: Target, state: _FileState, problem: _Problem) -> None:
        state.state = "waiting" if problem.waiting else "failing"
        said = f"{problem.reason}: {problem}"
        if problem.waiting or said == state.problem:
            return
        state.problem = said
        self._metrics.injection_failures.labels(problem.reason).inc()
        log.warning(
            "%s: cannot write the token file: %s",
            target.where,
            problem,
            exc_info=problem.failure,  # an internal error: its traceback, once
        )
        injection = target.injection
        self._event(
            target.pod_ref,
            "Warning",
            "TokenInjectionFailed",
            f"{injection.path} in container {injection.container}: {problem}",
        )

    def _annotation_problem(
        self,
        pod: dict[str, Any],
        reason: str,
        message: str,
        *,
        event_reason: str = "InvalidTokenAnnotation",
        failure: BaseException | None = None,
    ) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        if self._pod_problems.get(uid) == message:
            return
        self._pod_problems[uid] = message
        self._metrics.injection_failures.labels(reason).inc()
        log.warning(
            "pod %s/%s: %s", meta.get("namespace"), meta.get("name"), message, exc_info=failure
        )
        self._event(
            ObjectRef("Pod", meta.get("name", ""), meta.get("namespace", ""), uid),
            "Warning",
            event_reason,
            message,
        )

    def _pod_failed(self, uid: str, pod: dict[str, Any] | None, err: Exception) -> None:
        """An unexpected exception while planning a pod: reported once on that pod."""
        problem = _internal("planning the pod's files", err)
        if not isinstance(pod, dict):
            if self._pod_problems.get(uid) != str(problem):
                self._pod_problems[uid] = str(problem)
                self._metrics.injection_failures.labels("internal").inc()
                log.error("pod %s: %s", uid, problem, exc_info=err)
            return
        self._annotation_problem(
            pod, "internal", str(problem), event_reason="TokenInjectionFailed", failure=err
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
        lists, watches = self.pods.lists, self.pods.watches
        seen_lists, seen_watches = self._watch_counts
        if lists > seen_lists:
            self._metrics.api_calls.labels("list", "pods").inc(lists - seen_lists)
        if watches > seen_watches:
            self._metrics.api_calls.labels("watch", "pods").inc(watches - seen_watches)
        self._watch_counts = (lists, watches)


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
