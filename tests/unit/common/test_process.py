"""Process identity and signalling, on real child processes and fake /proc trees."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agents.common.process import (
    LiveProcesses,
    ProcessError,
    ProcessGone,
    ProcessRef,
    ProcessReplaced,
    is_running,
    signal_process,
    terminate,
)

# A process that only SIGKILL ends: says "ready" once SIGTERM is ignored, so
# the test never signals it before the handler is in place.
IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def fake_stat(pid: int, comm: str, start_time: int, state: str = "S", threads: int = 1) -> str:
    """A /proc/<pid>/stat line as kernel 6.x writes it (52 fields)."""
    after_comm = [
        state, "1", str(pid), str(pid), "0", "-1", "4194560", "1043", "0", "0", "0",
        "12", "3", "0", "0", "20", "0", str(threads), "0", str(start_time), "25165824", "1024",
        "18446744073709551615", "94000000000000", "94000000100000", "140000000000000",
        "0", "0", "0", "0", "0", "0", "0", "0", "0", "17", "3", "0", "0", "0", "0",
        "0", "94000000200000", "94000000300000", "94000000400000", "140000000100000",
        "140000000200000", "140000000200000", "140000000300000", "0",
    ]  # fmt: skip
    return f"{pid} ({comm}) {' '.join(after_comm)}\n"


def write_proc(root: Path, pid: int, content: str | bytes) -> None:
    (root / str(pid)).mkdir(parents=True)
    data = content.encode() if isinstance(content, str) else content
    (root / str(pid) / "stat").write_bytes(data)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects a test starts; each is killed (if still there) and reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.returncode is None:
            child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn(children: list[subprocess.Popen[str]]) -> Spawn:
    """Start a child with its stdout on a pipe; the `children` fixture reaps it."""

    def start(*argv: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        children.append(child)
        return child

    return start


def sleeper(spawn: Spawn) -> subprocess.Popen[str]:
    return spawn("sleep", "60")


def sigterm_ignorer(spawn: Spawn) -> subprocess.Popen[str]:
    child = spawn(sys.executable, "-c", IGNORES_SIGTERM)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    return child


# The main thread leaves with pthread_exit while another thread runs on: the
# kernel then shows the process as "Z" though it still runs.
MAIN_THREAD_EXITS = (
    "import ctypes, threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "print('ready', flush=True)\n"
    "ctypes.CDLL(None).pthread_exit(None)\n"
)


def wait_zombie(child: subprocess.Popen[str]) -> None:
    """Wait for `child` to exit without reaping it (waitid WNOWAIT): it stays a zombie."""
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE


def alive(child: subprocess.Popen[str]) -> bool:
    """Still running (not even a zombie), checked without reaping it."""
    try:
        return psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- ProcessRef ----------------------------------------------------------------


def test_ref_reads_the_start_time_psutil_sees(spawn: Spawn) -> None:
    child = sleeper(spawn)
    ref = ProcessRef.of(child.pid)
    assert ref == ProcessRef.of(child.pid)
    assert ref.pid == child.pid
    # psutil: create_time = boot time + starttime / CLK_TCK.
    ticks = os.sysconf("SC_CLK_TCK")
    expected = psutil.Process(child.pid).create_time()
    assert abs(psutil.boot_time() + ref.start_time / ticks - expected) < 0.05
    assert ref.start_time >= ProcessRef.of(os.getpid()).start_time


def test_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    write_proc(tmp_path, 1234, fake_stat(1234, "my (weird) proc", 987654))
    write_proc(tmp_path, 1235, fake_stat(1235, ") 1 2 3 (", 42))
    assert ProcessRef.of(1234, proc_root=tmp_path) == ProcessRef(1234, 987654)
    assert ProcessRef.of(1235, proc_root=str(tmp_path)) == ProcessRef(1235, 42)


def test_comm_that_is_not_utf8(tmp_path: Path) -> None:
    write_proc(tmp_path, 7, b"7 (\xff\xfe)) " + fake_stat(7, "x", 5).split(") ", 1)[1].encode())
    assert ProcessRef.of(7, proc_root=tmp_path).start_time == 5


def test_missing_process_is_gone(tmp_path: Path) -> None:
    with pytest.raises(ProcessGone, match="pid 99: no such process"):
        ProcessRef.of(99, proc_root=tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "1234 (truncated",
        "1234 (short) S 1 2 3\n",
        fake_stat(1234, "x", 0).replace(" 0 25165824", " x 25165824"),
    ],
    ids=["empty", "no-paren", "short", "not-a-number"],
)
def test_malformed_stat_is_an_error_not_gone(tmp_path: Path, content: str) -> None:
    write_proc(tmp_path, 1234, content)
    with pytest.raises(ProcessError) as caught:
        ProcessRef.of(1234, proc_root=tmp_path)
    assert not isinstance(caught.value, ProcessGone)


@pytest.mark.parametrize(("pid", "start"), [(0, 1), (-1, 1), (5, -1)])
def test_refuses_refs_that_are_not_one_process(pid: int, start: int) -> None:
    # kill(2) reads 0 and negative PIDs as process groups.
    with pytest.raises(ValueError):
        ProcessRef(pid, start)


def test_describe() -> None:
    assert ProcessRef(42, 1000).describe() == "pid 42 (started 1000 ticks after boot)"


@pytest.mark.parametrize(
    ("state", "threads", "running"),
    [
        ("S", 1, True),
        ("R", 4, True),
        ("D", 1, True),
        ("Z", 1, False),
        ("X", 1, False),
        ("Z", 2, True),
    ],
)
def test_is_running_from_a_fake_tree(
    tmp_path: Path, state: str, threads: int, running: bool
) -> None:
    write_proc(tmp_path, 1234, fake_stat(1234, "gpu (job)", 5000, state=state, threads=threads))
    assert is_running(ProcessRef(1234, 5000), proc_root=tmp_path) is running
    assert not is_running(ProcessRef(1234, 5001), proc_root=tmp_path)
    assert not is_running(ProcessRef(1235, 5000), proc_root=tmp_path)


def test_process_whose_main_thread_exited_still_runs(spawn: Spawn) -> None:
    child = spawn(sys.executable, "-c", MAIN_THREAD_EXITS)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    ref = ProcessRef.of(child.pid)
    deadline = time.monotonic() + 5
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "main thread did not exit"
        time.sleep(0.01)
    assert is_running(ref)
    assert terminate(ref, grace=5.0) == "terminated"
    assert not is_running(ref)
    assert child.wait(timeout=5) == -signal.SIGTERM


# --- signal_process --------------------------------------------------------------


def test_signal_reaches_the_process(spawn: Spawn) -> None:
    child = sleeper(spawn)
    signal_process(ProcessRef.of(child.pid), signal.SIGTERM)
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_wrong_start_time_is_refused_and_nothing_is_signalled(spawn: Spawn) -> None:
    child = sleeper(spawn)
    real = ProcessRef.of(child.pid)
    # What a PID read earlier looks like once the number went to a new process.
    stale = ProcessRef(child.pid, real.start_time + 1)
    with pytest.raises(ProcessReplaced, match="another process"):
        signal_process(stale, signal.SIGKILL)
    time.sleep(0.1)
    assert alive(child)
    assert is_running(real)
    assert not is_running(stale)


def test_recheck_reads_the_given_proc_root(spawn: Spawn, tmp_path: Path) -> None:
    """The re-check happens after the pidfd is open, against `proc_root`."""
    child = sleeper(spawn)
    real = ProcessRef.of(child.pid)
    write_proc(tmp_path, child.pid, fake_stat(child.pid, "sleep", real.start_time + 500))
    with pytest.raises(ProcessReplaced):
        signal_process(real, signal.SIGKILL, proc_root=tmp_path)
    with pytest.raises(ProcessGone):
        signal_process(real, signal.SIGKILL, proc_root=tmp_path / "empty")
    time.sleep(0.1)
    assert alive(child)


def _pinned(pid: int) -> ProcessRef:
    pidfd = os.pidfd_open(pid)
    try:
        return ProcessRef.of_pinned(pidfd, pid)
    finally:
        os.close(pidfd)


def test_a_pinned_ref_is_the_same_process_each_time(spawn: Spawn) -> None:
    child = sleeper(spawn)
    assert _pinned(child.pid) == _pinned(child.pid)
    assert _pinned(child.pid).start_time == ProcessRef.of(child.pid).start_time


def test_same_pid_and_start_tick_but_another_pidfd_inode_is_refused(spawn: Spawn) -> None:
    """PID reuse within one clock tick: the start time matches, the process does not.

    What `ns_last_pid` makes easy and a busy node makes possible: the process
    a ref was taken from is reaped and its PID handed out again within 10 ms.
    The newcomer's start time then equals the ref's; only pidfs's per-process
    inode tells them apart.
    """
    gone, newcomer = sleeper(spawn), sleeper(spawn)
    old_inode = _pinned(gone.pid).pidfd_inode
    now = _pinned(newcomer.pid)
    if now.pidfd_inode == old_inode:
        pytest.skip("pidfds share one inode on this kernel (no pidfs, before Linux 6.9)")
    # The newcomer's PID and start tick, with the departed process's inode.
    stale = ProcessRef(newcomer.pid, now.start_time, old_inode)
    with pytest.raises(ProcessReplaced, match="another process"):
        signal_process(stale, signal.SIGKILL)
    assert terminate(stale, grace=0.1) == "gone"
    time.sleep(0.1)
    assert alive(newcomer)
    signal_process(now, signal.SIGTERM)
    assert newcomer.wait(timeout=5) == -signal.SIGTERM


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_not_permitted_is_an_error_not_gone(spawn: Spawn) -> None:
    """EPERM must not read as "gone": the enforcer would think it had acted."""
    child = sleeper(spawn)
    ref = ProcessRef.of(child.pid)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 10
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            for attempt in (lambda: signal_process(ref, 0), lambda: terminate(ref, grace=0.1)):
                code += 1
                try:
                    attempt()
                except ProcessGone:
                    os._exit(code)
                except ProcessError as err:
                    if err.errno != errno.EPERM:
                        os._exit(code)
                else:
                    os._exit(code + 50)  # signalled another user's process
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert alive(child)
    assert is_running(ref)


def test_reaped_process_is_gone(spawn: Spawn) -> None:
    child = sleeper(spawn)
    ref = ProcessRef.of(child.pid)
    child.kill()
    child.wait(timeout=5)
    # ProcessReplaced too, should the number already be in use again.
    with pytest.raises(ProcessGone):
        signal_process(ref, signal.SIGTERM)
    try:
        now: ProcessRef | None = ProcessRef.of(ref.pid)
    except ProcessGone:
        now = None
    assert now != ref
    assert not is_running(ref)


def test_a_zombie_takes_the_signal_and_is_not_running(spawn: Spawn) -> None:
    child = spawn("true")
    ref = ProcessRef.of(child.pid)  # may be read before or after it exits
    wait_zombie(child)
    assert ProcessRef.of(child.pid) == ref
    signal_process(ref, signal.SIGTERM)  # kill(2) on a zombie succeeds and does nothing
    assert not is_running(ref)
    assert child.wait(timeout=5) == 0


# --- terminate -------------------------------------------------------------------


def test_cooperative_process_is_terminated_quickly(spawn: Spawn) -> None:
    child = sleeper(spawn)
    ref = ProcessRef.of(child.pid)
    started = time.monotonic()
    # Not reaped by anyone during terminate(): exit is seen while it is a zombie.
    assert terminate(ref, grace=5.0) == "terminated"
    assert time.monotonic() - started < 1.0
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_process_ignoring_sigterm_is_killed_after_grace(spawn: Spawn) -> None:
    child = sigterm_ignorer(spawn)
    ref = ProcessRef.of(child.pid)
    started = time.monotonic()
    assert terminate(ref, grace=0.3) == "killed"
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5
    assert child.wait(timeout=5) == -signal.SIGKILL


def test_reaped_process_is_gone_before_any_signal(spawn: Spawn) -> None:
    child = sleeper(spawn)
    ref = ProcessRef.of(child.pid)
    child.kill()
    child.wait(timeout=5)
    assert terminate(ref, grace=0.3) == "gone"


def test_zombie_counts_as_exited(spawn: Spawn) -> None:
    child = spawn(sys.executable, "-c", "pass")
    ref = ProcessRef.of(child.pid)
    wait_zombie(child)
    started = time.monotonic()
    assert terminate(ref, grace=5.0) == "gone"
    assert time.monotonic() - started < 1.0
    assert child.wait(timeout=5) == 0  # exited by itself, no signal reached it


def test_replaced_pid_is_gone_and_untouched(spawn: Spawn) -> None:
    child = sleeper(spawn)
    stale = ProcessRef(child.pid, ProcessRef.of(child.pid).start_time + 1)
    assert terminate(stale, grace=0.3) == "gone"
    time.sleep(0.1)
    assert alive(child)


def test_terminates_a_process_that_is_not_our_child(spawn: Spawn) -> None:
    """As the enforcer does with hostPID: the target's parent, not us, reaps it."""
    shell = spawn("sh", "-c", 'sleep 60 & echo "$!"; wait "$!"; echo "status $?"')
    assert shell.stdout is not None
    grandchild = int(shell.stdout.readline())
    ref = ProcessRef.of(grandchild)
    assert psutil.Process(grandchild).ppid() == shell.pid
    assert terminate(ref, grace=5.0) == "terminated"
    assert shell.stdout.readline() == f"status {128 + signal.SIGTERM}\n"
    assert shell.wait(timeout=5) == 0
    assert not is_running(ref)


def test_non_child_ignoring_sigterm_is_killed(spawn: Spawn) -> None:
    script = f'{sys.executable} -c "$1" & echo "$!"; wait "$!"; echo "status $?"'
    shell = spawn("sh", "-c", script, "sh", IGNORES_SIGTERM)
    assert shell.stdout is not None
    grandchild = int(shell.stdout.readline())
    assert shell.stdout.readline() == "ready\n"
    assert terminate(ProcessRef.of(grandchild), grace=0.3) == "killed"
    assert shell.stdout.readline() == f"status {128 + signal.SIGKILL}\n"
    assert shell.wait(timeout=5) == 0


def test_live_processes_forget_a_process_when_it_exits() -> None:
    table: LiveProcesses[str] = LiveProcesses()
    child = subprocess.Popen(["sleep", "60"])
    try:
        ref, fact = table.add(child.pid, lambda r: f"learned {r.pid}")
        assert (ref, fact) == (_pinned(child.pid), f"learned {child.pid}")
        table.prune()
        assert table.get(child.pid) == (ref, fact)
        child.kill()
        child.wait()
        # The pidfd polls readable at exit: the facts go before the PID is reused.
        table.prune()
        assert table.get(child.pid) is None and len(table) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        table.close()


def test_live_processes_retain_and_missing_pid() -> None:
    table: LiveProcesses[int] = LiveProcesses()
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        for child in children:
            table.add(child.pid, lambda r: r.start_time)
        table.retain([children[0].pid])
        assert table.get(children[0].pid) is not None
        assert table.get(children[1].pid) is None
        with pytest.raises(ProcessGone):
            table.add(2**22 + 12345, lambda r: 0)  # above pid_max: never a process
        assert len(table) == 1
    finally:
        for child in children:
            child.kill()
            child.wait()
        table.close()
    assert len(table) == 0
