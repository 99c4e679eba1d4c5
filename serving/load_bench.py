"""`cascade bench serve`: QPS and latency percentiles of `cascade serve` under concurrent load.

For each model, in one run: the SavedModel called in this process (the floor, no RPC), then
`cascade serve` started as a separate process without and with server-side batching, each driven
by a `grpc.aio` client at several concurrency levels through the official TF Serving stubs. Every
request asks for one user; the load is bounded by a request count and a time limit, and only
loopback addresses are used.

The server's overhead is also measured *paired*: with the unbatched server up, each user is asked
once in-process and once over gRPC, alternately, one call at a time. The phases above run minutes
apart, and on a shared 2-core machine their medians drift by more than the overhead itself; the
median of the paired ratios cancels that drift (and any difference between users).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import client, export, local
from towers import files

log = logging.getLogger(__name__)

CONCURRENCY = (1, 8, 32)
MODES = ("in-process", "grpc", "grpc+batching")


def run_serve_benchmark(model_base_path: str | os.PathLike, out_dir: str | os.PathLike,
                        models: tuple[str, ...] = ("retrieval",), concurrency: tuple[int, ...] = CONCURRENCY,
                        requests: int = 400, time_limit: float = 60.0) -> dict:
    """Measures every (model, mode, concurrency); writes serve.{json,md,png} to `out_dir`."""
    base = pathlib.Path(model_base_path).resolve()
    users = _users(base, models[0])
    rows, paired, functions = [], [], {model: _load(base / model) for model in models}
    for model in models:
        rows += [_in_process(functions[model], model, users, c, requests, time_limit)
                 for c in concurrency]
    for mode in MODES[1:]:
        with _server(base, batching=mode.endswith("batching")) as address:
            for model in models:
                client.wait_until_available(address, model, timeout=300)
                for c in concurrency:
                    latencies, seconds = asyncio.run(_drive(address, model, users, c, requests, time_limit))
                    rows.append(_summary(model, mode, c, latencies, seconds))
                    log.info("%s %s c=%d: %.0f QPS, p50 %.1f ms", model, mode, c,
                             rows[-1]["qps"], rows[-1]["p50_ms"])
                if mode == "grpc":
                    paired.append(_paired(functions[model], address, model, users, requests,
                                          time_limit))
                    log.info("%s paired: in-process p50 %.1f ms, gRPC p50 %.1f ms, overhead %+.1f%%",
                             model, paired[-1]["in_process_p50_ms"], paired[-1]["grpc_p50_ms"],
                             paired[-1]["overhead_p50"] * 100)
    results = {"requests_per_level": requests, "rows": rows, "paired": paired}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out / "serve.json", json.dumps(results, indent=2).encode())
    files.write_atomic(out / "serve.md", format_table(results).encode())
    _plot(results, out / "serve.png")
    return results


def format_table(results: dict) -> str:
    lines = ["| model | mode | concurrency | QPS | p50 ms | p95 ms | p99 ms | p50 over in-process |",
             "|---" * 8 + "|"]
    floor = {(r["model"], r["concurrency"]): r["p50_ms"] for r in results["rows"] if r["mode"] == "in-process"}
    for r in results["rows"]:
        overhead = r["p50_ms"] / floor[(r["model"], r["concurrency"])] - 1
        lines.append(f"| {r['model']} | {r['mode']} | {r['concurrency']} | {r['qps']:,.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{'' if r['mode'] == 'in-process' else f'{overhead:+.0%}'} |")
    if results.get("paired"):
        lines += ["", "Server overhead, paired (concurrency 1, each user in-process then over gRPC):",
                  "", "| model | pairs | in-process p50 ms | gRPC p50 ms | gRPC - in-process, p50 ms "
                  "| overhead (median of paired ratios) |", "|---" * 6 + "|"]
        for r in results["paired"]:
            lines.append(f"| {r['model']} | {r['pairs']} | {r['in_process_p50_ms']:.1f} | "
                         f"{r['grpc_p50_ms']:.1f} | {r['difference_p50_ms']:+.1f} | "
                         f"{r['overhead_p50']:+.1%} |")
    return "\n".join(lines) + "\n"


def _users(base: pathlib.Path, model: str) -> list[str]:
    record = json.loads((local.latest_version(base / model) / "assets.extra" / export.RECORD_FILE).read_text())
    from towers import features, runs

    tables = features.FeatureTables.load(pathlib.Path(record["run_dir"]) / runs.TABLES_FILE)
    return [str(u) for u in tables.user_ids]


def _load(model_dir: pathlib.Path):
    """The newest version's serving signature, loaded in this process and warmed up."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the tokenizer ops the exports use

    fn = tf.saved_model.load(str(local.latest_version(model_dir))).signatures[export.SIGNATURE]
    fn(user_id=tf.constant(["1"]))
    return fn


def _paired(fn, address: str, model: str, users: list[str], requests: int,
            time_limit: float) -> dict:
    """Each user asked in-process, then over gRPC (official stub), one call at a time."""
    import tensorflow as tf

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))
    stub.Predict(_request(model, users[0]), timeout=60)  # warm up
    local_ms, remote_ms = [], []
    deadline = time.monotonic() + time_limit
    for n in range(requests):
        if time.monotonic() >= deadline:
            break
        user = users[n % len(users)]
        started = time.perf_counter()
        fn(user_id=tf.constant([user]))
        middle = time.perf_counter()
        stub.Predict(_request(model, user), timeout=60)
        local_ms.append((middle - started) * 1000)
        remote_ms.append((time.perf_counter() - middle) * 1000)
    local_ms, remote_ms = np.array(local_ms), np.array(remote_ms)
    return {"model": model, "pairs": len(local_ms),
            "in_process_p50_ms": float(np.median(local_ms)),
            "grpc_p50_ms": float(np.median(remote_ms)),
            "difference_p50_ms": float(np.median(remote_ms - local_ms)),
            "overhead_p50": float(np.median(remote_ms / local_ms - 1))}


def _in_process(fn, model: str, users: list[str], concurrency: int, requests: int,
                time_limit: float) -> dict:
    import tensorflow as tf

    latencies, lock, counter = [], threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + time_limit

    def worker():
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            started = time.perf_counter()
            fn(user_id=tf.constant([users[n % len(users)]]))
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return _summary(model, "in-process", concurrency, latencies, time.perf_counter() - started)


async def _drive(address: str, model: str, users: list[str], concurrency: int, requests: int,
                 time_limit: float) -> tuple[list[float], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        await stub.Predict(_request(model, users[0]), timeout=60)  # warm up
        latencies, next_index = [], iter(range(requests))
        deadline = time.monotonic() + time_limit

        async def worker():
            while time.monotonic() < deadline:
                n = next(next_index, None)
                if n is None:
                    return
                started = time.perf_counter()
                await stub.Predict(_request(model, users[n % len(users)]), timeout=60)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _request(model: str, user: str) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["user_id"].CopyFrom(client._string_tensor([user]))
    return request


def _summary(model: str, mode: str, concurrency: int, latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"model": model, "mode": mode, "concurrency": concurrency, "requests": len(ms),
            "qps": len(ms) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99))}


class _server:
    """`cascade serve` in a child process on a free loopback port, stopped with SIGTERM."""

    def __init__(self, base: pathlib.Path, batching: bool):
        self.base, self.batching = base, batching

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "serving.cli", "serve", "--model-base-path", str(self.base),
                   "--port", str(port), "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0"]
        if self.batching:
            command += ["--enable_batching", "--batching_parameters_file", str(self.base / export.BATCHING_FILE)]
        self.log = tempfile.TemporaryFile()  # a pipe nobody reads would block the server
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    models = sorted({r["model"] for r in results["rows"]})
    figure, axes = pyplot.subplots(len(models), 2, figsize=(10, 3.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for mode in MODES:
            points = sorted((r for r in results["rows"] if r["model"] == model and r["mode"] == mode),
                            key=lambda r: r["concurrency"])
            c = [p["concurrency"] for p in points]
            axes[row][0].plot(c, [p["qps"] for p in points], "o-", label=mode)
            axes[row][1].plot(c, [p["p50_ms"] for p in points], "o-", label=f"{mode} p50")
            axes[row][1].plot(c, [p["p99_ms"] for p in points], "x--", label=f"{mode} p99", alpha=0.6)
        for axis, label in ((axes[row][0], "queries / s"), (axes[row][1], "latency (ms)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(label)
            axis.set_title(f"{model}: {label}")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    pyplot.close(figure)
    os.replace(staging, path)
