"""Limits: our annotation, peers' resources, namespace default, the agreed share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.gpu_enforcer.limits import (
    ANNOTATION_LIMIT,
    ANNOTATION_SOFT_LIMIT,
    GIB,
    MIB,
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


def test_our_annotation_wins() -> None:
    limit = LimitPolicy(replicas=4).resolve(
        pod({ANNOTATION_LIMIT: "6Gi"}, {"nvidia.com/gpumem": 3000}), TOTAL
    )
    assert limit is not None
    assert (limit.hard_bytes, limit.source) == (6 * GIB, "annotation")
    assert limit.soft_bytes == int(6 * GIB * 0.9)


def test_soft_limit_annotation() -> None:
    limit = LimitPolicy().resolve(
        pod({ANNOTATION_LIMIT: "6Gi", ANNOTATION_SOFT_LIMIT: "4Gi"}), TOTAL
    )
    assert limit is not None and limit.soft_bytes == 4 * GIB


def test_hami_gpumem_is_mib_per_gpu() -> None:
    p = {
        "metadata": {"annotations": {}},
        "spec": {
            "containers": [
                {"resources": {"limits": {"nvidia.com/gpumem": "3000"}}},
                {"resources": {"limits": {"nvidia.com/gpumem": 1000}}},
            ]
        },
    }
    limit = LimitPolicy(replicas=4).resolve(p, TOTAL)
    assert limit is not None and limit.hard_bytes == 4000 * MIB
    assert limit.source == "nvidia.com/gpumem"


def test_hami_percentage_and_aliyun() -> None:
    percent = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpumem-percentage": "25"}}}]},
    }
    aliyun = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"aliyun.com/gpu-mem": "8"}}}]},
    }
    assert LimitPolicy().resolve(percent, TOTAL).hard_bytes == 10 * GIB  # type: ignore[union-attr]
    assert LimitPolicy().resolve(aliyun, TOTAL).hard_bytes == 8 * GIB  # type: ignore[union-attr]


def test_namespace_default_before_the_share() -> None:
    limit = LimitPolicy(replicas=4).resolve(pod(), TOTAL, namespace_default="7Gi")
    assert limit is not None and (limit.hard_bytes, limit.source) == (7 * GIB, "namespace default")


def test_share_is_card_over_replicas_times_requested() -> None:
    one = pod(limits={"nvidia.com/gpu": "1"})
    two = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu.shared": "2"}}}]},
    }
    policy = LimitPolicy(replicas=4)
    assert policy.resolve(one, TOTAL).hard_bytes == 10 * GIB  # type: ignore[union-attr]
    assert policy.resolve(two, TOTAL).hard_bytes == 20 * GIB  # type: ignore[union-attr]
    many = {
        "metadata": {},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
    }
    assert policy.resolve(many, TOTAL).hard_bytes == TOTAL  # type: ignore[union-attr]


def test_nothing_known_means_no_limit() -> None:
    assert LimitPolicy().resolve(pod(), TOTAL) is None


def test_bad_annotation_is_an_error_not_a_guess() -> None:
    with pytest.raises(LimitError):
        LimitPolicy(replicas=4).resolve(pod({ANNOTATION_LIMIT: "lots"}), TOTAL)


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
