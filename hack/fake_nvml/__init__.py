"""A fake NVML world for tests: a C `libnvidia-ml.so.1` driven by a state file.

The real `nvidia-ml-py` (pynvml) loads the fake as it loads NVIDIA's library,
so the code under test goes through the real bindings. The library re-reads
the state file on every call; `FakeNvmlWorld` rewrites it atomically, so a
test can change the world while an agent runs. The file format is described
at the top of `fake_nvml.c`.

Pointing code at the fake:

- Subprocess (what an agent run looks like): `world.subprocess_env(library)`
  sets `LD_LIBRARY_PATH=<build dir>` (pynvml calls
  `CDLL("libnvidia-ml.so.1")`, which searches it) and `FAKE_NVML_STATE`.
- In process: `with load_in_process(library, world.path): ...` installs the
  fake as `pynvml.nvmlLib` and restores pynvml afterwards. glibc answers a
  later `dlopen("libnvidia-ml.so.1")` with any loaded object of that SONAME,
  even one loaded RTLD_LOCAL by absolute path (checked on glibc 2.36), so
  loading the subprocess copy here would make every later test in the
  process find "NVML". The in-process copy is the same code built under its
  own SONAME, `libfakenvml-inprocess.so`, which nothing looks up by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import os
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
IN_PROCESS_NAME = "libfakenvml-inprocess.so"
STATE_ENV = "FAKE_NVML_STATE"
DEFAULT_DRIVER = "550.54.15"

MiB = 1 << 20
GiB = 1 << 30

# NVML return codes (nvml.h), for `inject`.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

# Characters written as they are; everything else is percent-escaped.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+()[],@")


class BuildError(RuntimeError):
    """The fake library could not be compiled."""


def find_compiler() -> str | None:
    """The system C compiler, or None when there is none."""
    return shutil.which("gcc") or shutil.which("cc")


def build(out_dir: Path) -> Path:
    """Compile the fake into `out_dir`; returns the path of `libnvidia-ml.so.1`.

    Also builds the in-process copy (`IN_PROCESS_NAME`). A library newer than
    the source is kept. Each file is compiled under a temporary name and
    renamed into place, so a process that has the old one mapped keeps
    working and a concurrent loader never sees half a file.
    """
    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C compiler (gcc or cc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    source_mtime = SOURCE.stat().st_mtime_ns
    for name in (LIBRARY_NAME, IN_PROCESS_NAME):
        target = out_dir / name
        if target.exists() and target.stat().st_mtime_ns > source_mtime:
            continue
        partial = out_dir / f".{name}.{os.getpid()}.tmp"
        command = [
            compiler,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-pthread",
            f"-Wl,-soname,{name}",
            "-o",
            str(partial),
            str(SOURCE),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"{' '.join(command)} failed:\n{done.stderr}")
        os.replace(partial, target)
    return out_dir / LIBRARY_NAME


def _escape(value: str) -> str:
    """Percent-escape a value for the state file (spaces become %20)."""
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value)


def fake_uuid(index: int, seed: int = 0xFA4E) -> str:
    """A stable UUID in NVML's `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` shape."""
    return f"GPU-{seed:08x}-0000-4000-8000-{index:012x}"


@dataclass(frozen=True)
class FakeGpu:
    """One card as NVML reports it."""

    index: int
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    total: int = 40 * GiB
    used: int | None = None
    """Device memory in use; None: the sum of its processes' known usage."""
    mig: bool | None = False
    """MIG mode; None: a card without MIG support (GetMigMode: NOT_SUPPORTED)."""
    mig_pending: bool | None = None
    """Mode after the next reset; None: same as `mig`."""
    minor: int | None = None
    """/dev/nvidia<minor>; None: the index."""
    reserved: int = 0
    """Driver-reserved memory (memory info v2); v1 counts it as used."""
    util_gpu: int = 0
    util_memory: int = 0


@dataclass(frozen=True)
class FakeProcess:
    """A process holding memory on one card."""

    gpu_index: int
    pid: int
    used: int | None
    """Bytes; None: NVML_VALUE_NOT_AVAILABLE (pynvml reports usedGpuMemory None)."""
    gpu_instance: int | None = None
    """MIG GPU instance; None: 0 on a card in MIG mode, else 0xFFFFFFFF."""
    compute_instance: int | None = None
    graphics: bool = False
    """Listed by GetGraphicsRunningProcesses instead of GetComputeRunningProcesses."""


@dataclass(frozen=True)
class FakeError:
    """Make `function` return `code` (for one device, for the first `times` calls)."""

    function: str
    """C symbol name, e.g. nvmlDeviceGetComputeRunningProcesses_v3; `nvmlDevice*` matches
    a prefix."""
    code: int
    device: int | None = None
    times: int | None = None
    tag: str | None = None
    """Makes the line unique: the library counts `times` per line text, for its lifetime."""


class FakeNvmlWorld:
    """The devices, processes and injected errors the fake library reports."""

    def __init__(
        self,
        path: Path,
        gpus: Iterable[FakeGpu] = (),
        processes: Iterable[FakeProcess] = (),
        errors: Iterable[FakeError] = (),
        driver: str = DEFAULT_DRIVER,
    ) -> None:
        self.path = path
        self.gpus = list(gpus)
        self.processes = list(processes)
        self.errors = list(errors)
        self.driver = driver

    def write(
        self,
        gpus: Iterable[FakeGpu] | None = None,
        processes: Iterable[FakeProcess] | None = None,
        errors: Iterable[FakeError] | None = None,
        driver: str | None = None,
    ) -> FakeNvmlWorld:
        """Replace the parts given and write the state file atomically."""
        if gpus is not None:
            self.gpus = list(gpus)
        if processes is not None:
            self.processes = list(processes)
        if errors is not None:
            self.errors = list(errors)
        if driver is not None:
            self.driver = driver
        text = self.render()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; an agent may run as another user
            with os.fdopen(fd, "w") as out:
                out.write(text)
            # rename(2) replaces the name atomically: the library opens either file whole.
            os.replace(partial, self.path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return self

    def render(self) -> str:
        """The state file's text."""
        lines = ["# fake NVML state (hack/fake_nvml)", f"driver {_escape(self.driver)}"]
        for gpu in sorted(self.gpus, key=lambda g: g.index):
            used = gpu.used
            if used is None:
                used = sum(p.used for p in self.processes if p.gpu_index == gpu.index and p.used)
            fields = [
                f"device {gpu.index}",
                f"uuid={_escape(gpu.uuid)}",
                f"name={_escape(gpu.name)}",
                f"total={gpu.total}",
                f"used={used}",
                f"reserved={gpu.reserved}",
                f"mig={'na' if gpu.mig is None else int(gpu.mig)}",
                f"util_gpu={gpu.util_gpu}",
                f"util_mem={gpu.util_memory}",
            ]
            if gpu.mig is not None and gpu.mig_pending is not None:
                fields.append(f"mig_pending={int(gpu.mig_pending)}")
            if gpu.minor is not None:
                fields.append(f"minor={gpu.minor}")
            lines.append(" ".join(fields))
        for proc in self.processes:
            fields = [
                f"process {proc.gpu_index}",
                f"pid={proc.pid}",
                f"used={'na' if proc.used is None else proc.used}",
                f"type={'graphics' if proc.graphics else 'compute'}",
            ]
            if proc.gpu_instance is not None:
                fields.append(f"gi={proc.gpu_instance}")
            if proc.compute_instance is not None:
                fields.append(f"ci={proc.compute_instance}")
            lines.append(" ".join(fields))
        for error in self.errors:
            fields = [f"error {error.function} {error.code}"]
            if error.device is not None:
                fields.append(f"device={error.device}")
            if error.times is not None:
                fields.append(f"times={error.times}")
            if error.tag is not None:
                fields.append(f"id={_escape(error.tag)}")
            lines.append(" ".join(fields))
        return "\n".join(lines) + "\n"

    def remove(self) -> None:
        """Delete the state file: init answers DRIVER_NOT_LOADED, other calls UNKNOWN."""
        self.path.unlink(missing_ok=True)

    def gpu(self, index: int) -> FakeGpu:
        return next(g for g in self.gpus if g.index == index)

    def set_gpu(self, index: int, **changes: Any) -> FakeNvmlWorld:
        """Change fields of one card (`dataclasses.replace`) and write."""
        gpus = [dataclasses.replace(g, **changes) if g.index == index else g for g in self.gpus]
        return self.write(gpus=gpus)

    def set_used(self, pid: int, used: int | None) -> FakeNvmlWorld:
        """Change what a process holds (None: not available) and write."""
        if not any(p.pid == pid for p in self.processes):
            raise KeyError(pid)
        processes = [
            dataclasses.replace(p, used=used) if p.pid == pid else p for p in self.processes
        ]
        return self.write(processes=processes)

    def add_process(self, process: FakeProcess) -> FakeNvmlWorld:
        return self.write(processes=[*self.processes, process])

    def remove_process(self, pid: int) -> FakeNvmlWorld:
        return self.write(processes=[p for p in self.processes if p.pid != pid])

    def inject(
        self, function: str, code: int, device: int | None = None, times: int | None = None
    ) -> FakeError:
        """Make `function` fail with `code` and write; `times` errors get a unique tag."""
        tag = uuidlib.uuid4().hex[:12] if times is not None else None
        error = FakeError(function, code, device=device, times=times, tag=tag)
        self.write(errors=[*self.errors, error])
        return error

    def clear_errors(self) -> FakeNvmlWorld:
        return self.write(errors=[])

    def subprocess_env(
        self, library: Path, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """An environment in which a child's pynvml loads the fake and reads this world."""
        env = dict(os.environ if base is None else base)
        search = [str(library.parent)]
        if env.get("LD_LIBRARY_PATH"):
            search.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(search)
        env[STATE_ENV] = str(self.path)
        return env


@contextlib.contextmanager
def load_in_process(library: Path, state_path: Path) -> Iterator[ctypes.CDLL]:
    """Make this process's pynvml use the fake, reading `state_path`; undone on exit.

    `library` is what `build` returned (its in-process sibling is loaded) or
    the in-process copy itself. pynvml keeps the loaded library and function
    pointers in module globals; they are swapped in and restored, and the
    fake's init count and `times` counters are reset on entry and exit.
    """
    path = library if library.name == IN_PROCESS_NAME else library.with_name(IN_PROCESS_NAME)
    lib = ctypes.CDLL(str(path))
    lib.fakeNvmlSetStatePath.argtypes = [ctypes.c_char_p]
    lib.fakeNvmlSetStatePath.restype = ctypes.c_int
    if lib.fakeNvmlSetStatePath(os.fsencode(state_path)) != 0:
        raise ValueError(f"state path too long: {state_path}")
    lib.fakeNvmlReset()
    pynvml: Any = importlib.import_module("pynvml")  # no type information
    saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache), pynvml._nvmlLib_refcount)
    pynvml.nvmlLib = lib
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml._nvmlLib_refcount = 0
    try:
        yield lib
    finally:
        pynvml.nvmlLib, cache, pynvml._nvmlLib_refcount = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(cache)
        lib.fakeNvmlReset()
        lib.fakeNvmlSetStatePath(None)


# ---- named worlds -----------------------------------------------------------


def two_pods_one_card(path: Path, pids: Sequence[int] = (4101, 4202)) -> FakeNvmlWorld:
    """One 40 GiB A100 shared by time slicing: two processes, 10 and 6 GiB."""
    gpu = FakeGpu(0, fake_uuid(0))
    processes = [FakeProcess(0, pids[0], 10 * GiB), FakeProcess(0, pids[1], 6 * GiB)]
    return FakeNvmlWorld(path, [gpu], processes).write()


def eight_gpus_64_processes(path: Path, first_pid: int = 10000) -> FakeNvmlWorld:
    """Eight 80 GiB H100s with 64 processes each (512 in all), 1 GiB + i MiB apiece."""
    gpus = [FakeGpu(i, fake_uuid(i), "NVIDIA H100 80GB HBM3", 80 * GiB) for i in range(8)]
    processes = [
        FakeProcess(g, first_pid + g * 64 + i, GiB + i * MiB) for g in range(8) for i in range(64)
    ]
    return FakeNvmlWorld(path, gpus, processes).write()


def mig_card(path: Path, pids: Sequence[int] = (5101, 5202)) -> FakeNvmlWorld:
    """An A100 in MIG mode: processes carry GPU/compute instance ids."""
    gpu = FakeGpu(0, fake_uuid(0), mig=True)
    processes = [
        FakeProcess(0, pids[0], 4 * GiB, gpu_instance=1, compute_instance=0),
        FakeProcess(0, pids[1], 2 * GiB, gpu_instance=2, compute_instance=0),
    ]
    return FakeNvmlWorld(path, [gpu], processes).write()


def no_processes(path: Path) -> FakeNvmlWorld:
    """One idle card: the process list is empty, the driver holds a little memory."""
    gpu = FakeGpu(0, fake_uuid(0), used=0, reserved=512 * MiB)
    return FakeNvmlWorld(path, [gpu]).write()


__all__ = [
    "DEFAULT_DRIVER",
    "IN_PROCESS_NAME",
    "LIBRARY_NAME",
    "SOURCE",
    "STATE_ENV",
    "BuildError",
    "FakeError",
    "FakeGpu",
    "FakeNvmlWorld",
    "FakeProcess",
    "build",
    "eight_gpus_64_processes",
    "fake_uuid",
    "find_compiler",
    "load_in_process",
    "mig_card",
    "no_processes",
    "two_pods_one_card",
]
