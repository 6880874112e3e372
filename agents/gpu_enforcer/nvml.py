"""NVML through `nvidia-ml-py` (pynvml), isolated here as gpustat does.

Everything the enforcer knows about GPUs comes from `Nvml.snapshot()`. Errors
become `NvmlError` with NVML's code and name; an error on one GPU marks that
GPU, not the whole node. A node without the library or driver raises
`NvmlError` from `snapshot()`, and the agent stays up reporting it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# NVML return codes (nvml.h); pynvml has the same constants.
NVML_SUCCESS = 0
NVML_ERROR_INSUFFICIENT_SIZE = 7
# usedGpuMemory when the driver cannot tell (all ones).
NVML_VALUE_NOT_AVAILABLE = 2**64 - 1
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

# After these the library must be initialised again before the next call.
_REINIT_CODES = frozenset(
    {
        NVML_ERROR_UNINITIALIZED,
        NVML_ERROR_DRIVER_NOT_LOADED,
        NVML_ERROR_GPU_IS_LOST,
        NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        NVML_ERROR_UNKNOWN,
    }
)


class NvmlError(RuntimeError):
    """An NVML call failed: `code` is NVML's return code, `name` its short name."""

    def __init__(self, code: int, name: str, call: str) -> None:
        super().__init__(f"{call}: {name} ({code})")
        self.code = code
        self.name = name
        self.call = call


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU, as NVML lists it (host PID namespace)."""

    pid: int
    used_bytes: int | None  # None: NVML_VALUE_NOT_AVAILABLE


@dataclass(frozen=True)
class Gpu:
    """One GPU at one instant. `error` set: nothing below it can be trusted."""

    index: int
    uuid: str
    name: str = ""
    total_bytes: int = 0
    used_bytes: int = 0
    mig: bool = False
    processes: tuple[GpuProcess, ...] = ()
    error: NvmlError | None = field(default=None, compare=False)


class Nvml:
    """Initialises NVML lazily, again after fatal errors, and reads snapshots."""

    def __init__(self, library: Any | None = None) -> None:
        # Tests pass their own pynvml-like module; production imports pynvml.
        self._lib = library
        self._initialised = False
        self._stale = False
        self._lock = threading.Lock()

    def _nvml(self) -> Any:
        if self._lib is None:
            try:
                import pynvml
            except ImportError as err:
                raise NvmlError(
                    NVML_ERROR_LIBRARY_NOT_FOUND, "nvidia-ml-py not installed", "import"
                ) from err
            self._lib = pynvml
        return self._lib

    def _call(self, name: str, *args: Any) -> Any:
        nvml = self._nvml()
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as err:
            code = int(getattr(err, "value", NVML_ERROR_UNKNOWN))
            if code in _REINIT_CODES:
                # Initialise again at the next snapshot, not now: the other
                # GPUs of this snapshot may still answer.
                self._stale = True
            raise NvmlError(code, _error_name(nvml, err, code), name) from err

    def _reset(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml().nvmlShutdown()
            except Exception as err:
                log.debug("nvmlShutdown after an error: %s", err)

    def snapshot(self) -> list[Gpu]:
        """Every GPU with its memory and compute processes; NvmlError if NVML is unusable."""
        with self._lock:
            if self._stale:
                self._stale = False
                self._reset()
            if not self._initialised:
                self._call("nvmlInit")
                self._initialised = True
            count = int(self._call("nvmlDeviceGetCount"))
            return [self._gpu(index) for index in range(count)]

    def _gpu(self, index: int) -> Gpu:
        uuid = f"index-{index}"
        try:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            uuid = _text(self._call("nvmlDeviceGetUUID", handle))
            name = _text(self._call("nvmlDeviceGetName", handle))
            memory = self._call("nvmlDeviceGetMemoryInfo", handle)
            mig = self._mig_enabled(handle)
            processes = () if mig else self._processes(handle)
        except NvmlError as err:
            log.warning("GPU %d (%s): %s", index, uuid, err)
            return Gpu(index=index, uuid=uuid, error=err)
        return Gpu(
            index=index,
            uuid=uuid,
            name=name,
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            mig=mig,
            processes=processes,
        )

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self._call("nvmlDeviceGetMigMode", handle)
        except NvmlError as err:
            if err.code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND):
                return False  # cards without MIG
            raise
        return bool(current)

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        raw = self._raw_processes(handle)
        if raw is not None:
            return raw
        found = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return tuple(
            GpuProcess(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
            for p in found
        )

    def _raw_processes(self, handle: Any) -> tuple[GpuProcess, ...] | None:
        """The v3 process list read straight from the ctypes array.

        pynvml converts every record into a "friendly object", which costs more
        than the rest of a tick on a card with 64 processes. Same protocol as
        pynvml: a count query with a NULL buffer (INSUFFICIENT_SIZE and the
        count), then a call with room to spare in case processes start
        meanwhile. None when this pynvml lacks the pieces: the public call is
        used then.
        """
        nvml = self._nvml()
        get_pointer = getattr(nvml, "_nvmlGetFunctionPointer", None)
        record = getattr(nvml, "c_nvmlProcessInfo_v3_t", None)
        if get_pointer is None or record is None:
            return None
        name = "nvmlDeviceGetComputeRunningProcesses_v3"
        try:
            fn = get_pointer(name)
        except nvml.NVMLError:
            return None
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == NVML_SUCCESS:
            return ()
        for _ in range(3):
            if ret != NVML_ERROR_INSUFFICIENT_SIZE:
                break
            count.value = count.value * 2 + 5
            records = (record * count.value)()
            ret = fn(handle, ctypes.byref(count), records)
            if ret == NVML_SUCCESS:
                return tuple(
                    GpuProcess(
                        int(r.pid),
                        None
                        if r.usedGpuMemory == NVML_VALUE_NOT_AVAILABLE
                        else int(r.usedGpuMemory),
                    )
                    for r in records[: count.value]
                )
        if ret in _REINIT_CODES:
            self._stale = True
        raise NvmlError(int(ret), _error_name(nvml, RuntimeError(ret), int(ret)), name)

    def processes(self, index: int) -> tuple[GpuProcess, ...]:
        """The compute processes of one GPU now (the re-check before a kill)."""
        with self._lock:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            return self._processes(handle)

    def close(self) -> None:
        with self._lock:
            self._reset()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error_name(nvml: Any, err: Exception, code: int) -> str:
    """NVML's short name for a code (`GPU_IS_LOST`), from pynvml's constants."""
    for attr in dir(nvml):
        if attr.startswith("NVML_ERROR_") and getattr(nvml, attr, None) == code:
            return attr.removeprefix("NVML_ERROR_")
    return str(err)
