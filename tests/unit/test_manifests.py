"""Static checks: manifests/mount-healer and images/Containerfile agree with the code.

A manifest that sets an env var the CLI does not read, names a console script
that does not exist, or scrapes the wrong port deploys fine and fails on the
node; these tests catch that in CI instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.mount_healer.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "manifests" / "mount-healer"
CONTAINERFILE = REPO / "images" / "Containerfile"
SIDECAR = "sidecar-snippet.yaml"
ENV_PREFIX = "AUTOMOUNT_HEALER_"
CONTAINER = "automount-healer"
NAMESPACE = "node-agents"
DEFAULT_METRICS_PORT = 9101
EVENT_GROUPS = {"", "events.k8s.io"}
EVENT_VERBS = {"create", "patch"}

Doc = dict[str, Any]


# libyaml's loader where PyYAML has it: these tests parse the manifests often.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> list[Doc]:
    """The non-empty documents of a YAML stream."""
    return [doc for doc in yaml.load_all(text, Loader=YAML_LOADER) if doc is not None]


def load_docs(path: Path) -> list[Doc]:
    return parse_yaml(path.read_text(encoding="utf-8"))


def kustomization(base: Path = BASE) -> Doc:
    (doc,) = load_docs(base / "kustomization.yaml")
    return doc


def base_objects(base: Path = BASE) -> list[Doc]:
    """The objects a base's kustomization lists, in order, as written (not rendered)."""
    return [doc for name in kustomization(base)["resources"] for doc in load_docs(base / name)]


def only(kind: str, docs: list[Doc] | None = None) -> Doc:
    """The one object of `kind` in `docs` (default: the healer base's objects)."""
    matches = [d for d in (base_objects() if docs is None else docs) if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def healer_container(pod_spec: Doc) -> Doc:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == CONTAINER]
    return container


def pod_specs() -> Iterator[tuple[str, Doc]]:
    """The pod specs that run the healer: the DaemonSet and the CSI sidecar example."""
    yield "daemonset", only("DaemonSet")["spec"]["template"]["spec"]
    yield "sidecar", only("DaemonSet", load_docs(BASE / SIDECAR))["spec"]["template"]["spec"]


POD_SPECS = dict(pod_specs())
pod_spec_params = pytest.mark.parametrize("pod_spec", POD_SPECS.values(), ids=POD_SPECS.keys())


def plain_env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def pyproject() -> Doc:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def console_scripts() -> set[str]:
    return set(pyproject()["project"]["scripts"])


@functools.cache
def _rendered(directory: Path) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


def kustomize(directory: Path) -> list[Doc]:
    """The objects `kubectl kustomize directory` renders (a fresh copy each call).

    Without kubectl the test is skipped, or fails in CI (`CI` set), where every
    kustomization must be rendered.
    """
    if shutil.which("kubectl") is None:
        reason = "kubectl not on PATH: cannot render the kustomization (`kubectl kustomize`)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    return parse_yaml(_rendered(directory))


# --- (a) the YAML as written ---------------------------------------------------------


# Each agent's base directory -> (its app name label, the one example file in
# it that is deliberately not a resource).
BASES = {
    "mount-healer": ("automount-healer", "sidecar-snippet.yaml"),
    "gpu-enforcer": ("gpu-mem-enforcer", "time-slicing-config.yaml"),
    "token-refresher": ("token-refresher", "example.yaml"),
}
# Components (e.g. gpu-enforcer/evict) included.
BASE_FILES = [
    (base, path) for base in BASES for path in sorted((REPO / "manifests" / base).rglob("*.yaml"))
]


@pytest.mark.parametrize(
    ("base", "path"),
    BASE_FILES,
    ids=[str(p.relative_to(REPO / "manifests")) for _, p in BASE_FILES],
)
def test_every_yaml_document_is_a_kubernetes_object(base: str, path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{base}/{path.name} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: no apiVersion/kind"


@pytest.mark.parametrize("base", sorted(BASES))
def test_kustomization_lists_existing_files_and_all_of_them(base: str) -> None:
    """Every manifest but the example is a resource; one namespace, one app label."""
    directory = REPO / "manifests" / base
    app, example = BASES[base]
    (kust,) = load_docs(directory / "kustomization.yaml")
    listed = kust["resources"]
    for name in listed:
        assert (directory / name).is_file(), f"kustomization lists missing file {name}"
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml", example}
    assert on_disk == set(listed), "every manifest except the example is a resource"
    assert example not in listed, "an example belongs elsewhere (a user's namespace, a chart)"
    assert kust["namespace"] == NAMESPACE
    (labels,) = kust["labels"]
    assert labels["pairs"] == {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/part-of": NAMESPACE,
    }
    assert labels["includeSelectors"] is True


@pod_spec_params
def test_command_is_a_console_script(pod_spec: Doc) -> None:
    command = healer_container(pod_spec)["command"]
    assert command[0] in console_scripts(), f"{command[0]} is not in [project.scripts]"


@pod_spec_params
def test_env_vars_are_flags_of_the_cli(pod_spec: Doc, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide help so that no env var name is wrapped across lines.
    monkeypatch.setenv("COLUMNS", "1000")
    env = plain_env(healer_container(pod_spec))
    agent_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert agent_env, "the manifest configures the healer through env vars"
    for name, value in agent_env.items():
        parser = build_parser(environ={name: value})
        try:
            parser.parse_args([])
        except SystemExit:
            pytest.fail(f"the CLI rejects {name}={value!r}")
        assert name in parser.format_help(), f"{name} is not an env var of any flag"
    # All together, through the same validation as `main` (e.g. roots are absolute).
    config_from_args([], agent_env)


@pod_spec_params
def test_node_name_comes_from_the_downward_api(pod_spec: Doc) -> None:
    env = {e["name"]: e for e in healer_container(pod_spec)["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pod_spec_params
def test_autofs_roots_are_bidirectional_host_paths(pod_spec: Doc) -> None:
    container = healer_container(pod_spec)
    roots = plain_env(container)[f"{ENV_PREFIX}ROOTS"].split(",")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for root in roots:
        assert root in mounts, f"root {root} is not mounted into the container"
        mount = mounts[root]
        # The unmount must reach the host's autofs root, not a slave copy.
        assert mount.get("mountPropagation") == "Bidirectional", root
        assert "hostPath" in volumes[mount["name"]], f"{root} is not a hostPath"
    # The API server rejects Bidirectional propagation in unprivileged containers.
    assert container["securityContext"]["privileged"] is True


@pod_spec_params
def test_probes_use_the_health_endpoints(pod_spec: Doc) -> None:
    container = healer_container(pod_spec)
    port_names = {p["name"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in port_names, f"{probe} uses an undeclared port {get['port']}"


@pod_spec_params
def test_metrics_port_is_the_port_the_agent_listens_on(pod_spec: Doc) -> None:
    container = healer_container(pod_spec)
    env = plain_env(container)
    args = build_parser(environ=env).parse_args([])
    expected = args.metrics_address.port
    if f"{ENV_PREFIX}METRICS_ADDRESS" not in env:
        assert expected == DEFAULT_METRICS_PORT
    (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == expected


def test_rbac_allows_only_creating_and_patching_events() -> None:
    docs = load_docs(BASE / "rbac.yaml")
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding"}
    role = only("ClusterRole", docs)
    groups: set[str] = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
        assert "pods/exec" not in rule["resources"]
        assert set(rule["resources"]) == {"events"}, rule
        assert set(rule["verbs"]) <= EVENT_VERBS, rule
        assert set(rule["apiGroups"]) <= EVENT_GROUPS, rule
        groups |= set(rule["apiGroups"])
    assert groups == EVENT_GROUPS, "Events in core and events.k8s.io"

    binding = only("ClusterRoleBinding", docs)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = only("ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert POD_SPECS["daemonset"]["serviceAccountName"] == account


def test_daemonset_runs_in_the_host_namespaces_it_needs() -> None:
    spec = POD_SPECS["daemonset"]
    assert spec["hostPID"] is True  # fdinfo and process-event PIDs are the host's
    assert spec["hostNetwork"] is True  # the process-event connector: initial netns only
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "cpu" not in healer_container(spec)["resources"].get("limits", {})


def test_podmonitor_scrapes_the_metrics_port() -> None:
    monitor = only("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    node_label = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "relabelings": [node_label],  # alerts and the dashboard name the node
    }


# --- (b) the rendered kustomization --------------------------------------------------


def test_kustomize_renders_the_base() -> None:
    kinds = sorted(d["kind"] for d in kustomize(BASE))
    assert kinds == sorted(
        ["DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PodMonitor"]
    )


@pytest.mark.parametrize("base", sorted(BASES))
def test_every_rendered_object_is_labelled_namespaced_and_selected(base: str) -> None:
    docs = kustomize(REPO / "manifests" / base)
    app, _example = BASES[base]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == app
    workloads = [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
    assert workloads
    for workload in workloads:
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), workload["metadata"]["name"]
        # Kustomize does not rewrite PodMonitor selectors: they must still match the pods.
        monitor_selector = only("PodMonitor", docs)["spec"]["selector"]["matchLabels"]
        assert monitor_selector.items() <= pod_labels.items(), workload["metadata"]["name"]
    # The bindings' subjects follow the rendered namespace.
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        (subject,) = binding["subjects"]
        assert subject["namespace"] == NAMESPACE


# --- (c) the Containerfile -----------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def words(args: str) -> list[str]:
    """Exec (JSON) form or shell form, as a list of words."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(w) for w in parsed]
    return shlex.split(args)


def test_containerfile_copies_existing_paths() -> None:
    copies = [args for keyword, args in containerfile_instructions() if keyword in ("COPY", "ADD")]
    assert copies, "the Containerfile copies the project in"
    for args in copies:
        parts = words(args)
        if any(p.startswith("--from") for p in parts):
            continue  # from another stage, not the build context
        *sources, _dest = [p for p in parts if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_containerfile_command_is_a_console_script() -> None:
    instructions = dict(containerfile_instructions())  # the last one of each counts
    assert "CMD" in instructions or "ENTRYPOINT" in instructions
    for keyword in ("ENTRYPOINT", "CMD"):
        if keyword in instructions:
            # Exec form: the agent is PID 1 of its container and gets SIGTERM itself.
            assert instructions[keyword].startswith("["), f"{keyword} in shell form"
    command = words(instructions.get("ENTRYPOINT", "[]")) + words(instructions.get("CMD", "[]"))
    assert command[0] in console_scripts(), f"{command[0]} is not in [project.scripts]"


def installed_extras() -> set[str]:
    """The extras of the project that the Containerfile's `pip install .[...]` names, in a
    RUN line or in an images/ script a RUN line runs (images/build-venv.sh: `"$src[...]"`)."""
    runs = [args for keyword, args in containerfile_instructions() if keyword == "RUN"]
    scripts = {word for args in runs for word in words(args) if word.startswith("images/")}
    texts = runs + [(REPO / script).read_text(encoding="utf-8") for script in sorted(scripts)]
    extras: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            if re.search(r"\bpip\b.*\binstall\b", line):
                for group in re.findall(r"(?:(?<![\w/])\.|\$src|\$\{src\})\[([^\]]*)\]", line):
                    extras |= {e.strip() for e in group.split(",") if e.strip()}
    return extras


def test_containerfile_installs_existing_extras_and_the_kube_one() -> None:
    declared = set(pyproject()["project"]["optional-dependencies"])
    extras = installed_extras()
    assert extras <= declared, f"extras not in pyproject.toml: {extras - declared}"
    assert "kube" in extras, "Events and watches need the kube client"
    assert "test" not in extras, "the image carries no test tools"


def test_containerfile_base_image_is_pinned() -> None:
    instructions = containerfile_instructions()
    defaults = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    froms = [words(a)[0] for keyword, a in instructions if keyword == "FROM"]
    assert froms, "no FROM"
    for ref in froms:
        if ref == "scratch":
            continue  # the empty image: nothing is pulled
        image = defaults.get(ref.removeprefix("${").removesuffix("}"), ref)
        name, _, tag = image.partition("@")[0].rpartition(":")
        # An explicit tag at least (a digest is better); never the moving `latest`.
        assert "@sha256:" in image or (name and tag and tag != "latest"), f"unpinned {image}"
