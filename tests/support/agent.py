"""Run an agent's `main(argv)` in a thread, as a test's background process."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

from prometheus_client import CollectorRegistry

Main = Callable[..., int]


class AgentThread:
    """`with AgentThread(main, argv) as agent:` runs until the block ends (stop + join)."""

    def __init__(self, main: Main, argv: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        self.stop = threading.Event()
        self.stdout = io.StringIO()
        self.exit_code: int | None = None
        self._main = main
        self._argv = list(argv)
        self._thread = threading.Thread(target=self._run, name="agent-under-test")

    def _run(self) -> None:
        self.exit_code = self._main(
            self._argv, stop=self.stop, registry=self.registry, stdout=self.stdout
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from the agent's registry (0 when absent)."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def __enter__(self) -> AgentThread:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "agent did not stop within 15 s"
        assert self.exit_code == 0, f"agent exited with {self.exit_code}"
