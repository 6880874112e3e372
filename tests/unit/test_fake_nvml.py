"""The fake `libnvidia-ml.so.1`, through the real pynvml.

These tests pin what the GPU enforcer's tests rely on: the fake answers as
NVML does (return codes, the count-query protocol, struct layouts) and
follows its state file from one call to the next.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hack.fake_nvml import (
    FakeGpu,
    FakeNvmlWorld,
    FakeProcess,
    GiB,
    MiB,
    build,
    eight_gpus_64_processes,
    fake_uuid,
    find_compiler,
    load_in_process,
    mig_card,
    no_processes,
    two_pods_one_card,
)

pynvml: Any = importlib.import_module("pynvml")  # no type information

NOT_APPLICABLE = 0xFFFFFFFF


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if find_compiler() is None:
        reason = "needs a C compiler (gcc) to build the fake libnvidia-ml.so.1"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    return build(tmp_path_factory.mktemp("fake_nvml"))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "nvml.state"


@pytest.fixture
def lib(library: Path, state: Path) -> Iterator[ctypes.CDLL]:
    """The fake, installed as this process's pynvml library for one test."""
    with load_in_process(library, state) as loaded:
        yield loaded


@pytest.fixture
def nvml(lib: ctypes.CDLL) -> Any:
    return pynvml


def two_cards(state: Path) -> FakeNvmlWorld:
    gpus = [
        FakeGpu(0, fake_uuid(0)),
        FakeGpu(1, fake_uuid(1), "NVIDIA L4", 24 * GiB, mig=None, minor=5),
    ]
    processes = [FakeProcess(0, 100, 1 * GiB), FakeProcess(1, 200, 2 * GiB)]
    return FakeNvmlWorld(state, gpus, processes).write()


def compute_pids(nvml: Any, index: int) -> list[tuple[int, int | None]]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


def test_init_shutdown_and_versions(nvml: Any, state: Path) -> None:
    FakeNvmlWorld(state, [FakeGpu(0, fake_uuid(0))], driver="535.104.05").write()
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()

    nvml.nvmlInit()
    nvml.nvmlInit()  # reference counted, as NVML is
    assert nvml.nvmlSystemGetDriverVersion() == "535.104.05"
    assert nvml.nvmlSystemGetNVMLVersion() == "12.535.104.05"
    nvml.nvmlShutdown()
    assert nvml.nvmlDeviceGetCount() == 1
    nvml.nvmlShutdown()

    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlShutdown()


def test_devices_handles_and_identity(nvml: Any, state: Path) -> None:
    two_cards(state)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 2
    for index, name, minor in [(0, "NVIDIA A100-SXM4-40GB", 0), (1, "NVIDIA L4", 5)]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        assert nvml.nvmlDeviceGetUUID(handle) == fake_uuid(index)
        assert nvml.nvmlDeviceGetName(handle) == name
        assert nvml.nvmlDeviceGetIndex(handle) == index
        assert nvml.nvmlDeviceGetMinorNumber(handle) == minor
        by_uuid = nvml.nvmlDeviceGetHandleByUUID(fake_uuid(index))
        assert address(by_uuid) == address(handle)
        # Handles are stable across calls and re-reads.
        assert address(nvml.nvmlDeviceGetHandleByIndex(index)) == address(handle)

    with pytest.raises(nvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetHandleByUUID(fake_uuid(7))
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(2)


def test_names_are_percent_escaped(nvml: Any, state: Path) -> None:
    name = "NVIDIA A100 #1 = 100% (test)"
    FakeNvmlWorld(state, [FakeGpu(0, fake_uuid(0), name)]).write()
    assert "%20" in state.read_text()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(0)) == name


def test_memory_info_both_versions(nvml: Any, state: Path) -> None:
    world = two_pods_one_card(state)
    world.set_gpu(0, reserved=512 * MiB)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    v1 = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert (v1.total, v1.used, v1.free) == (40 * GiB, 16 * GiB + 512 * MiB, 23 * GiB + 512 * MiB)

    v2 = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    assert (v2.total, v2.reserved, v2.used, v2.free) == (
        40 * GiB,
        512 * MiB,
        16 * GiB,
        23 * GiB + 512 * MiB,
    )

    with pytest.raises(nvml.NVMLError_ArgumentVersionMismatch):
        nvml.nvmlDeviceGetMemoryInfo(handle, version=1)


def test_utilization(nvml: Any, state: Path) -> None:
    FakeNvmlWorld(state, [FakeGpu(0, fake_uuid(0), util_gpu=87, util_memory=40)]).write()
    nvml.nvmlInit()
    util = nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(0))
    assert (util.gpu, util.memory) == (87, 40)


def test_mig_mode_current_and_pending(nvml: Any, state: Path) -> None:
    world = mig_card(state)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(handle) == [1, 1]
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert [(p.pid, p.gpuInstanceId, p.computeInstanceId) for p in procs] == [
        (5101, 1, 0),
        (5202, 2, 0),
    ]

    world.set_gpu(0, mig_pending=False)  # disabled, takes effect at the next reset
    assert nvml.nvmlDeviceGetMigMode(handle) == [1, 0]
    world.set_gpu(0, mig=False, mig_pending=None)
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    world.set_gpu(0, mig=None)  # a card without MIG
    with pytest.raises(nvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetMigMode(handle)


def test_compute_and_graphics_processes(nvml: Any, state: Path) -> None:
    world = two_pods_one_card(state)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4101, 10 * GiB), (4202, 6 * GiB)]
    assert {(p.gpuInstanceId, p.computeInstanceId) for p in procs} == {
        (NOT_APPLICABLE, NOT_APPLICABLE)
    }
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses(handle) == []
    v2 = nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
    assert [(p.pid, p.usedGpuMemory) for p in v2] == [(4101, 10 * GiB), (4202, 6 * GiB)]

    world.add_process(FakeProcess(0, 4303, 1 * GiB, graphics=True))
    graphics = nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
    assert [(p.pid, p.usedGpuMemory) for p in graphics] == [(4303, GiB)]
    assert len(nvml.nvmlDeviceGetComputeRunningProcesses(handle)) == 2


def test_no_processes(nvml: Any, state: Path) -> None:
    no_processes(state)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetComputeRunningProcesses(handle) == []
    assert nvml.nvmlDeviceGetMemoryInfo(handle).used == 512 * MiB


def test_usage_not_available_is_none(nvml: Any, state: Path) -> None:
    world = two_pods_one_card(state)
    world.set_used(4202, None)
    assert "used=na" in state.read_text()
    nvml.nvmlInit()
    assert compute_pids(nvml, 0) == [(4101, 10 * GiB), (4202, None)]


def test_injected_error_for_one_device(nvml: Any, state: Path) -> None:
    world = two_cards(state)
    nvml.nvmlInit()
    world.inject("nvmlDeviceGetComputeRunningProcesses_v3", 15, device=1)

    assert compute_pids(nvml, 0) == [(100, GiB)]
    for _ in range(2):  # no `times`: every call
        with pytest.raises(nvml.NVMLError_GpuIsLost):
            compute_pids(nvml, 1)
    # Other calls on the device still answer.
    assert nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(1)) == "NVIDIA L4"

    world.clear_errors()
    assert compute_pids(nvml, 1) == [(200, 2 * GiB)]


def test_error_with_times_recovers(nvml: Any, state: Path) -> None:
    world = two_pods_one_card(state)
    nvml.nvmlInit()
    world.inject("nvmlDeviceGetComputeRunningProcesses_v3", 999, times=1)

    with pytest.raises(nvml.NVMLError_Unknown):
        compute_pids(nvml, 0)
    assert len(compute_pids(nvml, 0)) == 2
    # Re-writing the file (same error line) does not re-arm it.
    world.set_used(4101, 11 * GiB)
    assert compute_pids(nvml, 0)[0] == (4101, 11 * GiB)

    world.inject("nvmlDeviceGetComputeRunningProcesses_v3", 999, times=2)  # a new line
    for _ in range(2):
        with pytest.raises(nvml.NVMLError_Unknown):
            compute_pids(nvml, 0)
    assert len(compute_pids(nvml, 0)) == 2


def test_injected_init_error(nvml: Any, state: Path) -> None:
    world = two_pods_one_card(state)
    world.inject("nvmlInitWithFlags", 18)
    with pytest.raises(nvml.NVMLError_LibRmVersionMismatch):
        nvml.nvmlInit()
    world.clear_errors()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 1


def test_prefix_error_loses_one_card(nvml: Any, state: Path) -> None:
    world = two_cards(state)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    world.inject("nvmlDevice*", 15, device=0)

    assert nvml.nvmlDeviceGetCount() == 2  # not a per-device call
    with pytest.raises(nvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetMemoryInfo(handle)
    assert compute_pids(nvml, 1) == [(200, 2 * GiB)]


def test_state_change_seen_by_next_call(nvml: Any, state: Path) -> None:
    world = two_cards(state)
    nvml.nvmlInit()
    second = nvml.nvmlDeviceGetHandleByIndex(1)
    assert compute_pids(nvml, 0) == [(100, GiB)]

    world.set_used(100, 3 * GiB)
    assert compute_pids(nvml, 0) == [(100, 3 * GiB)]
    world.add_process(FakeProcess(0, 101, GiB))
    assert compute_pids(nvml, 0) == [(100, 3 * GiB), (101, GiB)]
    world.remove_process(100)
    assert compute_pids(nvml, 0) == [(101, GiB)]

    world.write(gpus=world.gpus[:1], processes=[])  # the second card falls off the bus
    assert nvml.nvmlDeviceGetCount() == 1
    with pytest.raises(nvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetMemoryInfo(second)


def test_missing_state_file(nvml: Any, state: Path) -> None:
    with pytest.raises(nvml.NVMLError_DriverNotLoaded):
        nvml.nvmlInit()
    world = two_pods_one_card(state)
    nvml.nvmlInit()
    world.remove()
    with pytest.raises(nvml.NVMLError_Unknown):
        nvml.nvmlDeviceGetCount()


def test_64_processes_on_one_device(nvml: Any, state: Path) -> None:
    processes = [FakeProcess(0, 20000 + i, (i + 1) * MiB) for i in range(64)]
    FakeNvmlWorld(state, [FakeGpu(0, fake_uuid(0))], processes).write()
    nvml.nvmlInit()
    assert compute_pids(nvml, 0) == [(20000 + i, (i + 1) * MiB) for i in range(64)]


def test_eight_gpus_64_processes(nvml: Any, state: Path) -> None:
    eight_gpus_64_processes(state)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 8
    seen = [compute_pids(nvml, i) for i in range(8)]
    assert [len(s) for s in seen] == [64] * 8
    assert len({pid for s in seen for pid, _ in s}) == 512
    used = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(3)).used
    assert used == sum(u for _, u in seen[3] if u is not None)


def test_count_query_protocol_at_the_c_level(lib: ctypes.CDLL, state: Path) -> None:
    """nvml.h's conventions, called as a C program would."""
    two_pods_one_card(state)
    assert ctypes.sizeof(pynvml.c_nvmlProcessInfo_v3_t) == 24
    Procs = pynvml.c_nvmlProcessInfo_v3_t * 5
    list_procs = lib.nvmlDeviceGetComputeRunningProcesses_v3
    handle = ctypes.c_void_p()
    count = ctypes.c_uint(0)

    assert lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == pynvml.NVML_ERROR_UNINITIALIZED
    assert lib.nvmlInit_v2() == pynvml.NVML_SUCCESS
    assert lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == pynvml.NVML_SUCCESS

    # Count query: *count == 0 and a NULL array.
    count.value = 0
    assert list_procs(handle, ctypes.byref(count), None) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 2
    # An array too small: the size needed comes back.
    procs = Procs()
    count.value = 1
    assert list_procs(handle, ctypes.byref(count), procs) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 2
    # Room to spare: the number filled in comes back.
    count.value = 5
    assert list_procs(handle, ctypes.byref(count), procs) == pynvml.NVML_SUCCESS
    assert count.value == 2
    assert [(p.pid, p.usedGpuMemory, p.gpuInstanceId) for p in procs[:2]] == [
        (4101, 10 * GiB, NOT_APPLICABLE),
        (4202, 6 * GiB, NOT_APPLICABLE),
    ]
    assert procs[2].pid == 0  # untouched
    count.value = 3
    assert list_procs(handle, ctypes.byref(count), None) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert list_procs(handle, None, procs) == pynvml.NVML_ERROR_INVALID_ARGUMENT

    # No processes: the count query succeeds with 0.
    no_processes(state)
    count.value = 0
    assert list_procs(handle, ctypes.byref(count), None) == pynvml.NVML_SUCCESS
    assert count.value == 0

    # String buffers: too small is INSUFFICIENT_SIZE, never a truncated string.
    name = ctypes.create_string_buffer(8)
    assert lib.nvmlDeviceGetName(handle, name, 8) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    # A pointer that is not one of the fake's handles.
    stray = ctypes.c_uint(0)
    assert lib.nvmlDeviceGetName(ctypes.byref(stray), name, 8) == 2
    assert lib.nvmlShutdown() == pynvml.NVML_SUCCESS


def test_unimplemented_function_is_function_not_found(nvml: Any, state: Path) -> None:
    two_pods_one_card(state)
    nvml.nvmlInit()
    with pytest.raises(nvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetSerial(nvml.nvmlDeviceGetHandleByIndex(0))


def test_malformed_lines_ignored_and_reported_once(
    nvml: Any, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    good = FakeNvmlWorld(state, [FakeGpu(0, fake_uuid(0))]).render()
    state.write_text(good + "frobnicate 1\nprocess 0 pid=7\ndevice 1 total=1\n")
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 1
    assert compute_pids(nvml, 0) == []
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert all(line.startswith(f"fake_nvml: {state}:") for line in err)
    assert "frobnicate 1" in err[0]
    assert "process needs pid= and used=" in err[1]
    assert "device needs uuid= and total=" in err[2]


def test_concurrent_calls_while_the_world_changes(nvml: Any, state: Path) -> None:
    """Callers on several threads see the old or the new world, whole."""
    world = two_pods_one_card(state)
    three = [*world.processes, FakeProcess(0, 4303, GiB)]
    two = list(world.processes)
    nvml.nvmlInit()
    seen: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def call() -> None:
        try:
            while not stop.is_set():
                seen.append(len(compute_pids(nvml, 0)))
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(200):
            world.write(processes=three if i % 2 else two)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not failures
    assert set(seen) <= {2, 3}
    assert len(seen) > 0


def test_in_process_load_leaves_the_soname_free(library: Path, state: Path) -> None:
    """After the context, pynvml and the dynamic loader are as they were."""

    def soname_loaded() -> bool:
        try:
            ctypes.CDLL("libnvidia-ml.so.1", mode=os.RTLD_NOLOAD)
        except OSError:
            return False
        return True

    if soname_loaded():
        pytest.skip("a libnvidia-ml.so.1 is already loaded in this process")
    before = pynvml.nvmlLib
    two_pods_one_card(state)
    with load_in_process(library, state):
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 1
    assert pynvml.nvmlLib is before
    assert not soname_loaded()


def test_build_reuses_a_fresh_library(library: Path) -> None:
    mtime = library.stat().st_mtime_ns
    assert build(library.parent) == library
    assert library.stat().st_mtime_ns == mtime


CHILD = textwrap.dedent(
    """
    import sys
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        print(type(err).__name__, flush=True)
        sys.exit(0)
    loaded = [l.split()[-1] for l in open("/proc/self/maps") if "libnvidia-ml" in l]
    print(loaded[0], flush=True)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for _ in range(2):
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        print(sorted((p.pid, p.usedGpuMemory) for p in procs), flush=True)
        sys.stdin.readline()
    pynvml.nvmlShutdown()
    """
)


def test_subprocess_through_ld_library_path(library: Path, state: Path) -> None:
    """As an agent runs: pynvml's own dlopen("libnvidia-ml.so.1") finds the fake."""
    world = two_pods_one_card(state)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=world.subprocess_env(library),
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == str(library)
        assert child.stdout.readline().strip() == str([(4101, 10 * GiB), (4202, 6 * GiB)])
        world.set_used(4202, None)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == str([(4101, 10 * GiB), (4202, None)])
        child.communicate("\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == 0


def test_subprocess_without_state_file(library: Path, state: Path) -> None:
    env = FakeNvmlWorld(state).subprocess_env(library)  # never written
    command = [sys.executable, "-c", CHILD]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "NVMLError_DriverNotLoaded", done.stderr
