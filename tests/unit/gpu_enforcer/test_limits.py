"""Limits: the admin's (declared peer scheduler, namespace default, share), lowered by the pod's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.gpu_enforcer.limits import (
    ANNOTATION_LIMIT,
    ANNOTATION_SOFT_LIMIT,
    GIB,
    MIB,
    AdminLimit,
    Limit,
    LimitError,
    LimitPolicy,
    LimitsFile,
    parse_quantity,
    replicas_from_device_plugin_config,
)

TOTAL = 40 * GIB


def pod(
    annotations: dict[str, str] | None = None, limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": "u1",
            "name": "nb",
            "namespace": "ml",
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "main", "resources": {"limits": limits or {}}}]},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gi", 10 * GIB),
        ("512Mi", 512 * MIB),
        ("1.5Gi", int(1.5 * GIB)),
        ("1G", 10**9),
        ("1000", 1000),
        ("2e3", 2000),
        (4096, 4096),
        ("  3Gi ", 3 * GIB),
    ],
)
def test_parse_quantity(text: str | int, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "10GB", "-1Gi", "ten", "1.2.3Gi", "Gi"])
def test_bad_quantity(text: str) -> None:
    with pytest.raises(LimitError):
        parse_quantity(text)


def resolve(policy: LimitPolicy, p: dict[str, Any], admin: str | None = None) -> Limit:
    found = policy.resolve(p, TOTAL, AdminLimit(admin, "namespace ml default") if admin else None)
    assert found.limit is not None and not found.problems, found
    return found.limit


HAMI = frozenset({"hami"})
NS_DEFAULT = "namespace ml default"
OURS = f"pod annotation {ANNOTATION_LIMIT}"


def test_the_pod_annotation_lowers_the_share() -> None:
    limit = resolve(LimitPolicy(replicas=4), pod({ANNOTATION_LIMIT: "6Gi"}))
    assert (limit.hard_bytes, limit.source) == (6 * GIB, OURS)
    assert limit.soft_bytes == int(6 * GIB * 0.9)


@pytest.mark.parametrize(
    ("admin", "expected", "source"),
    [(None, 10 * GIB, "share 1/4"), ("7Gi", 7 * GIB, NS_DEFAULT)],
)
def test_the_pod_annotation_never_raises_the_admins_limit(
    admin: str | None, expected: int, source: str
) -> None:
    # Issue 9.5: `1Ei` exempted the pod from the share and the namespace default.
    limit = resolve(LimitPolicy(replicas=4), pod({ANNOTATION_LIMIT: "1Ei"}), admin)
    assert (limit.hard_bytes, limit.source) == (expected, source)


def test_the_pod_annotation_alone_is_a_limit_the_pod_chose() -> None:
    # No admin limit at all: a pod may still volunteer one (lower than none).
    limit = resolve(LimitPolicy(), pod({ANNOTATION_LIMIT: "6Gi"}))
    assert (limit.hard_bytes, limit.source) == (6 * GIB, OURS)


@pytest.mark.parametrize("bad", ["lots", "-1Gi", "", "10GB"])
def test_an_unparsable_pod_annotation_keeps_the_admins_limit(bad: str) -> None:
    # Issue 9.5: it used to mean "no limit at all".
    found = LimitPolicy(replicas=4).resolve(pod({ANNOTATION_LIMIT: bad}), TOTAL)
    assert found.limit is not None
    assert (found.limit.hard_bytes, found.limit.source) == (10 * GIB, "share 1/4")
    assert len(found.problems) == 1 and ANNOTATION_LIMIT in found.problems[0]


def test_soft_limit_annotation() -> None:
    limit = resolve(LimitPolicy(), pod({ANNOTATION_LIMIT: "6Gi", ANNOTATION_SOFT_LIMIT: "4Gi"}))
    assert limit.soft_bytes == 4 * GIB


def test_the_soft_limit_is_never_above_the_admins_hard_limit() -> None:
    both = {ANNOTATION_LIMIT: "1Ei", ANNOTATION_SOFT_LIMIT: "1Ei"}
    limit = resolve(LimitPolicy(replicas=4), pod(both))
    assert limit.hard_bytes == limit.soft_bytes == 10 * GIB
    soft_only = resolve(LimitPolicy(replicas=4), pod({ANNOTATION_SOFT_LIMIT: "1Ei"}))
    assert soft_only.soft_bytes == soft_only.hard_bytes == 10 * GIB


def test_an_unparsable_soft_limit_keeps_the_hard_limit_and_the_default_fraction() -> None:
    found = LimitPolicy(replicas=4).resolve(pod({ANNOTATION_SOFT_LIMIT: "lots"}), TOTAL)
    assert found.limit == Limit(10 * GIB, int(10 * GIB * 0.9), "share 1/4")
    assert len(found.problems) == 1 and ANNOTATION_SOFT_LIMIT in found.problems[0]


def test_an_unparsable_admin_default_falls_to_the_share() -> None:
    found = LimitPolicy(replicas=4).resolve(pod(), TOTAL, AdminLimit("many", NS_DEFAULT))
    assert found.limit is not None and found.limit.source == "share 1/4"
    assert found.problems and NS_DEFAULT in found.problems[0]


def test_hami_gpumem_is_mib_per_gpu_and_the_admins_when_hami_is_declared() -> None:
    p = {
        "metadata": {"annotations": {}},
        "spec": {
            "containers": [
                {"resources": {"limits": {"nvidia.com/gpumem": "30000"}}},
                {"resources": {"limits": {"nvidia.com/gpumem": 1000}}},
            ]
        },
    }
    limit = resolve(LimitPolicy(replicas=4, peer_schedulers=HAMI), p, "7Gi")
    assert limit.hard_bytes == 31000 * MIB  # above the share and the default: HAMi placed it
    assert limit.source == "nvidia.com/gpumem (hami scheduler)"


def test_undeclared_peer_quantities_may_only_lower_the_limit() -> None:
    big = pod(limits={"nvidia.com/gpumem": "30000"})
    assert resolve(LimitPolicy(replicas=4), big).source == "share 1/4"
    small = resolve(LimitPolicy(replicas=4), pod(limits={"nvidia.com/gpumem": "3000"}))
    assert (small.hard_bytes, small.source) == (3000 * MIB, "pod's nvidia.com/gpumem")
    gpushare_only = LimitPolicy(replicas=4, peer_schedulers=frozenset({"gpushare"}))
    assert resolve(gpushare_only, big).source == "share 1/4"


def test_the_pod_annotation_lowers_a_declared_peer_quantity_too() -> None:
    p = pod({ANNOTATION_LIMIT: "2Gi"}, {"nvidia.com/gpumem": "30000"})
    limit = resolve(LimitPolicy(replicas=4, peer_schedulers=HAMI), p)
    assert (limit.hard_bytes, limit.source) == (2 * GIB, OURS)


def test_hami_percentage_and_aliyun() -> None:
    percent = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpumem-percentage": "25"}}}]},
    }
    aliyun = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"aliyun.com/gpu-mem": "8"}}}]},
    }
    both = LimitPolicy(peer_schedulers=frozenset({"hami", "gpushare"}))
    assert resolve(both, percent).hard_bytes == 10 * GIB
    assert resolve(both, aliyun).hard_bytes == 8 * GIB
    assert resolve(both, aliyun).source == "aliyun.com/gpu-mem (gpushare scheduler)"


def test_an_unparsable_peer_quantity_is_ignored() -> None:
    found = LimitPolicy(replicas=4, peer_schedulers=HAMI).resolve(
        pod(limits={"nvidia.com/gpumem": "3Gi"}), TOTAL
    )
    assert found.limit is not None and found.limit.source == "share 1/4"
    assert found.problems and "nvidia.com/gpumem" in found.problems[0]


def test_namespace_default_before_the_share() -> None:
    limit = resolve(LimitPolicy(replicas=4), pod(), "7Gi")
    assert (limit.hard_bytes, limit.source) == (7 * GIB, NS_DEFAULT)


def test_share_is_card_over_replicas_times_requested() -> None:
    one = pod(limits={"nvidia.com/gpu": "1"})
    two = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu.shared": "2"}}}]},
    }
    policy = LimitPolicy(replicas=4)
    assert resolve(policy, one).hard_bytes == 10 * GIB
    assert resolve(policy, two).hard_bytes == 20 * GIB
    many = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
    }
    assert resolve(policy, many).hard_bytes == TOTAL


def test_nothing_known_means_no_limit() -> None:
    assert LimitPolicy().resolve(pod(), TOTAL).limit is None


def test_device_plugin_config_yaml_and_json() -> None:
    yaml_text = """
version: v1
sharing:
  timeSlicing:
    renameByDefault: false
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""
    assert replicas_from_device_plugin_config(yaml_text) == 4
    json_text = (
        '{"sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 8}]}}}'
    )
    assert replicas_from_device_plugin_config(json_text) == 8
    assert replicas_from_device_plugin_config("version: v1\n") is None


def test_limits_file(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text('default: 10Gi\npods:\n  "abc-123": 2Gi\n')
    limits = LimitsFile.load(path)
    assert limits.default == 10 * GIB and limits.pods == {"abc-123": 2 * GIB}
    assert limits.admin_limit("abc-123") == AdminLimit(str(2 * GIB), f"{path} pods.abc-123")
    assert limits.admin_limit("other") == AdminLimit(str(10 * GIB), f"{path} default")
    path.write_text('{"pods": {"x": "1Gi"}}')
    assert LimitsFile.load(path).default is None


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"pods": ["x"]}', '{"default": "many"}', '{"defualt": "1Gi"}', "a: [b"]
)
def test_bad_limits_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "limits.json"
    path.write_text(content)
    with pytest.raises(LimitError):
        LimitsFile.load(path)


def test_missing_limits_file(tmp_path: Path) -> None:
    with pytest.raises(LimitError, match="cannot read"):
        LimitsFile.load(tmp_path / "nope.json")
