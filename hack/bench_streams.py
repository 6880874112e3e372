"""Measure the controller's file server: memory per open stream, time to serve N nodes,
push latency of a Secret update to one node's files, cold claim verification.

    .venv/bin/python -m hack.bench_streams --nodes 300 --files 500

The server (with the fake API) runs in this process; the injectors' streams are
opened by a child process (raw TLS sockets, no threads), so that this process's
RSS is the server's own. Results are printed as one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry

from agents.common.kube import load_api_client
from agents.token_refresher.claims import ClaimVerifier
from agents.token_refresher.config import ControllerConfig, FilesConfig
from agents.token_refresher.controller import Controller
from agents.token_refresher.fileserver import FileServer, Renderer, TemplateCache, WatchedSecrets
from agents.token_refresher.metrics import ControllerMetrics, FilesMetrics
from agents.token_refresher.nodeauth import NodeAuthenticator
from tests.support.fake_kube import FakeKube
from tests.support.token_files import (
    CONTROLLER_NS,
    access_token,
    claim,
    injector_token,
    make_certs,
    put_injector,
    put_pod,
    put_token_secret,
)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _request(token: str, claims: list[dict[str, str]]) -> bytes:
    body = json.dumps({"pods": claims}).encode()
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def client(spec_path: str) -> None:
    """Child: open every stream, wait for each first snapshot, report, then hold them."""
    spec = json.loads(Path(spec_path).read_text())
    context = ssl.create_default_context(cadata=spec["ca"])
    started = time.monotonic()
    socks = []
    for entry in spec["streams"]:
        raw = socket.create_connection(("127.0.0.1", spec["port"]))
        sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(_request(entry["token"], entry["claims"]))
        socks.append(sock)
    waiting = set(range(len(socks)))
    buffers = [b""] * len(socks)
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, i)
    while waiting:
        for key, _ in selector.select(30):
            i = key.data
            buffers[i] += key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            if b'"snapshot"' in buffers[i] and i in waiting:
                waiting.discard(i)
    print(json.dumps({"open_seconds": time.monotonic() - started}), flush=True)
    sys.stdin.readline()  # hold the streams until the parent is done measuring


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--files", type=int, default=500, help="files on the push node")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--stack-kib", type=int, default=0, help="thread stack size (0: default)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client)
        return
    if args.stack_kib:
        threading.stack_size(args.stack_kib * 1024)
    results: dict[str, Any] = {"nodes": args.nodes, "stack_kib": args.stack_kib or "default"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-files-"))
    with FakeKube() as kube:
        api = load_api_client(str(kube.kubeconfig(tmp / "kubeconfig")))
        registry = CollectorRegistry()
        metrics = FilesMetrics(registry)
        controller = Controller(
            api,
            ControllerConfig(),
            refresh_fn=lambda *a: None,
            metrics=ControllerMetrics(registry),
            elector=None,
        )
        certs = make_certs()
        config = FilesConfig(host="127.0.0.1", port=0, max_pods=256)
        server = FileServer(
            config,
            authenticator=NodeAuthenticator(api, namespace=CONTROLLER_NS, metrics=metrics),
            verifier=ClaimVerifier(api, metrics=metrics),
            renderer=Renderer(WatchedSecrets(controller.caches), TemplateCache(api)),
            metrics=metrics,
            ssl_context=certs.server_context(),
            rng=random.Random(1),
        )
        controller.add_listener(server.secret_changed)
        # One token Secret per namespace; two pods per node use it.
        streams = []
        for n in range(args.nodes):
            ns = f"ns{n % 50}"
            if n < 50:
                put_token_secret(kube, "tok", ns, access_token(ns))
            pods = [
                put_pod(
                    kube,
                    f"p{n}-{i}",
                    ns,
                    f"node{n}",
                    inject=[{"secretName": "tok", "container": "app", "owner": 1000}],
                )
                for i in range(2)
            ]
            token = injector_token(kube, put_injector(kube, f"node{n}"))
            streams.append({"token": token, "claims": [claim(p) for p in pods]})
        controller.start()
        controller.wait_synced(30)
        server.start()
        time.sleep(0.5)
        before = _rss()
        threads_before = threading.active_count()
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"port": server.port, "ca": certs.ca_pem, "streams": streams}))
        child = subprocess.Popen(
            [sys.executable, "-m", "hack.bench_streams", "--client", str(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        opened = json.loads(child.stdout.readline())
        time.sleep(0.5)
        after = _rss()
        results["open_all_streams_seconds"] = round(opened["open_seconds"], 3)
        results["streams"] = server.streams
        results["threads_added"] = threading.active_count() - threads_before
        results["rss_before_mib"] = round(before / 2**20, 1)
        results["rss_per_stream_kib"] = round((after - before) / max(1, args.nodes) / 1024, 1)

        # Push: one node with `--files` files (pods of 2 files each, 256 claims max).
        pods_needed = min(256, (args.files + 1) // 2)
        per_pod = max(1, args.files // pods_needed)
        put_token_secret(kube, "big", "push", access_token("push"))
        inject = [
            {"secretName": "big", "container": "app", "owner": 1000 + i, "path": f"/tmp/t{i}"}
            for i in range(per_pod)
        ]
        pods = [
            put_pod(kube, f"q{i}", "push", "pushnode", inject=inject) for i in range(pods_needed)
        ]
        token = injector_token(kube, put_injector(kube, "pushnode"))
        reads = server.verifier.reads
        t0 = time.monotonic()
        context = certs.client_context()
        raw = socket.create_connection(("127.0.0.1", server.port))
        sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(_request(token, [claim(p) for p in pods]))
        reader = sock.makefile("rb")
        while reader.readline().strip():
            pass  # headers

        def next_snapshot() -> dict[str, Any]:
            while True:
                size = int(reader.readline().strip(), 16)
                data = reader.read(size + 2)
                line = json.loads(data)
                if line["type"] == "snapshot":
                    return line  # type: ignore[no-any-return]

        first = next_snapshot()
        results["push_node_files"] = sum(len(p["files"]) for p in first["pods"])
        results["cold_snapshot_seconds"] = round(time.monotonic() - t0, 3)
        results["cold_pod_gets"] = server.verifier.reads - reads
        latencies = []
        for u in range(args.updates):
            new = access_token(f"u{u}")
            t0 = time.monotonic()
            put_token_secret(kube, "big", "push", new)
            snapshot = next_snapshot()
            latencies.append(time.monotonic() - t0)
            content = snapshot["pods"][-1]["files"][-1]["content"]
            assert base64.b64decode(content).decode() == new
        results["push_median_seconds"] = round(statistics.median(latencies), 4)
        results["push_worst_seconds"] = round(max(latencies), 4)
        results["snapshot_bytes"] = len(json.dumps(snapshot))
        sock.close()
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(30)
        server.close()
        controller.stop()
        api.close()
    print(json.dumps(results, indent=1))
    os._exit(0)  # leftover daemon threads of the fake API


if __name__ == "__main__":
    main()
