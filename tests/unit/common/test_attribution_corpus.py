"""Attribution against other projects' real `/proc/<pid>/cgroup` test data.

tests/data/cgroup_corpus.txt holds the lines, where each group comes from
(repository, path, commit) and what each line names: a pod and container, no
pod at all, or nothing to trust. Each line is parsed on its own, as the only
line of a cgroup file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agents.common.attribution import AttributionError, parse_cgroup

CORPUS = Path(__file__).parents[2] / "data" / "cgroup_corpus.txt"


@dataclass(frozen=True)
class Case:
    text: str
    expect: str  # "pod=<uid> container=<id>", "none" or "error"
    source: str
    lineno: int


def load_corpus(path: Path = CORPUS) -> list[Case]:
    cases: list[Case] = []
    source, expect, as_path = "", "", False
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not raw or raw.startswith("#"):
            continue
        word, _, rest = raw.partition(" ")
        if word == "source":
            source, expect, as_path = rest, "", False
        elif word == "expect":
            expect = rest
        elif word == "format":
            assert rest in ("path", "line"), f"{path}:{lineno}: format {rest!r}"
            as_path = rest == "path"
        else:
            assert source and expect, f"{path}:{lineno}: a line before its source/expect"
            cases.append(Case(f"0::{raw}\n" if as_path else f"{raw}\n", expect, source, lineno))
    return cases


CASES = load_corpus()


def test_the_corpus_covers_every_project_asked_for() -> None:
    sources = {c.source.split()[0] for c in CASES}
    assert {
        "open-telemetry/opentelemetry-java-instrumentation",
        "open-telemetry/opentelemetry-go",
        "open-telemetry/opentelemetry-js-contrib",
        "open-telemetry/opentelemetry-python-contrib",
        "DataDog/datadog-agent",
        "google/cadvisor",
    } <= sources
    assert {c.expect.split("=")[0] for c in CASES} == {"pod", "none", "error"}


@pytest.mark.parametrize("case", CASES, ids=[f"line{c.lineno}" for c in CASES])
def test_corpus_line(case: Case) -> None:
    if case.expect == "error":
        with pytest.raises(AttributionError):
            parse_cgroup(case.text)
        return
    found = parse_cgroup(case.text)
    if case.expect == "none":
        assert found is None, f"{case.source}: {case.text!r} names no pod"
        return
    fields = dict(part.split("=", 1) for part in case.expect.split())
    assert found is not None, f"{case.source}: {case.text!r} was left unattributed"
    assert (found.pod_uid, found.container_id) == (fields["pod"], fields["container"])
