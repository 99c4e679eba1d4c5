"""`cascade bench scale`: the whole pipeline on a synthetic dataset, each stage in its own process.

    synth ─► split ─► train-retrieval (1 epoch) ─► evaluate-retrieval ─► train-reranker (sample)
          ─► train-copywriter ─► export ─► batch (retrieval, N users) ─► serve (cascade, gRPC p50)

Every stage is a `cascade` command run as a child process, so its wall time and peak RSS are its
own: it is reaped with `os.wait4`, whose rusage holds the child's (and its reaped children's)
largest resident set, not a running maximum over the stages. A small launcher process starts and
reaps it, not the bench: at exec, Linux carries the forking process's peak RSS into the child's
ru_maxrss, so a child of the bench (which holds TensorFlow once it has served) would report at
least the bench's own peak. The serve stage is `cascade serve` answering one user per Predict
call; with `--reference-models` a second server answers from that base path's `cascade`, the two
asked in turn, so both p50s come from the same minutes of the same machine. Results go to
scale.{json,md,png} after every stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from towers import files
from towers import synth as towers_synth

log = logging.getLogger(__name__)

MEMORY_TARGET_GIB = 16  # every stage's peak RSS at a million users, on a 24 GiB machine
STAGES = ("synth", "split", "train-retrieval", "evaluate-retrieval", "train-reranker",
          "train-copywriter", "export", "batch", "serve")
CLI = (sys.executable, "-m", "serving.cli")
GIB_PER_KIB = 1 / 2**20  # ru_maxrss is in KiB on Linux
# argv: result file, command...; SIGTERM is passed on; writes "<exit code> <ru_maxrss KiB>".
LAUNCHER = """
import os, signal, sys
child = []
signal.signal(signal.SIGTERM, lambda *_: child and os.kill(child[0], signal.SIGTERM))
child.append(os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ))
_, status, usage = os.wait4(child[0], 0)
with open(sys.argv[1], "w") as result:
    result.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""
TAIL = 3_000  # characters of a failed stage's stderr in the error
SERVE_TIMEOUT = 3_600.0  # seconds for a server to load its model (a large cascade loads slowly)
HOLDOUT_SHARE = 0.1  # the re-ranker's held-out rows are at most this share of the training rows


class ScaleBenchError(RuntimeError):
    """A stage failed; the message names it, its command and the end of its stderr."""


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    users: int
    items: int
    interactions: int
    sizes: tuple[float, ...] = (1.0,)  # fractions of the three counts, one pipeline each
    batch_users: int = 100_000  # users `cascade batch` runs over (at most the dataset's)
    reranker_holdout: int = 20_000  # held-out rows, one softmax group each (the sample)
    reranker_validation_users: int = 300
    requests: int = 100  # gRPC Predict calls of one user each, per served model
    reference_models: str | None = None  # a base path whose `cascade` p50 is measured beside
    keep: bool = False  # keep the generated data, split and batch output
    seed: int = 0  # of the synthetic data
    retrieval_flags: tuple[str, ...] = ()  # more flags for each stage's command
    evaluate_flags: tuple[str, ...] = ()
    reranker_flags: tuple[str, ...] = ()
    copywriter_flags: tuple[str, ...] = ()
    export_flags: tuple[str, ...] = ()


def sizes(config: ScaleConfig) -> list[towers_synth.SynthConfig]:
    """The synthetic dataset of each fraction, checked before anything runs."""
    if not config.sizes or any(not 0 < f <= 1 for f in config.sizes):
        raise ValueError(f"--sizes must be fractions in (0, 1], got {config.sizes}")
    if config.requests < 1 or config.batch_users < 1:
        raise ValueError("--requests and --batch-users must be at least 1")
    scaled = lambda n, f: max(1, round(n * f))
    return [towers_synth.SynthConfig(scaled(config.users, f), scaled(config.items, f),
                                     scaled(config.interactions, f), seed=config.seed)
            for f in sorted(set(config.sizes))]


def run_scale_benchmark(config: ScaleConfig, out_dir: str | os.PathLike) -> dict:
    """Runs every stage at every size; writes scale.{json,md,png} to `out_dir` and returns them."""
    datasets, out = sizes(config), pathlib.Path(out_dir).resolve()
    reference = pathlib.Path(config.reference_models).resolve() if config.reference_models else None
    if reference and not reference.is_relative_to(out) and not (reference / "cascade").is_dir():
        raise FileNotFoundError(f"{reference / 'cascade'}: no cascade model to compare with "
                                "(--reference-models takes an export's base path)")
    results = {"config": dataclasses.asdict(config), "sizes": []}
    for dataset in datasets:
        size = {"users": dataset.users, "items": dataset.items,
                "interactions": dataset.interactions, "stages": []}
        results["sizes"].append(size)
        folder = out / f"u{dataset.users}-i{dataset.items}-n{dataset.interactions}"
        _run_size(config, dataset, folder, size, reference, lambda: write_results(results, out))
    return results


def _run_size(config: ScaleConfig, dataset, folder: pathlib.Path, size: dict,
              reference: pathlib.Path | None, save) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # this bench's own folder: a rerun starts clean
    data, split, run, models, batch = (folder / name for name in
                                       ("data", "split", "run", "models", "batch"))
    train_rows = dataset.interactions - round(dataset.interactions * 0.2)  # the default split
    holdout = min(config.reranker_holdout, max(1, int(train_rows * HOLDOUT_SHARE)))
    batch_users = min(config.batch_users, dataset.users)
    commands = {
        "synth": ["data", "synth", "--users", dataset.users, "--items", dataset.items,
                  "--interactions", dataset.interactions, "--seed", dataset.seed, "--out", data,
                  "--no-progress"],
        "split": ["data", "split", "--data", data, "--out", split],
        # Trained without the re-ranker's held-out rows, the run is the re-ranker's shadow too.
        "train-retrieval": ["train", "retrieval", "--data", split, "--run", run, "--epochs", 1,
                            "--holdout", holdout, *config.retrieval_flags],
        "evaluate-retrieval": ["evaluate", "retrieval", "--run", run, *config.evaluate_flags],
        "train-reranker": ["train", "reranker", "--run", run, "--holdout", holdout,
                           "--validation-users", config.reranker_validation_users,
                           *config.reranker_flags],
        "train-copywriter": ["train", "copywriter", "--run", run, *config.copywriter_flags],
        "export": ["export", "--run", run, "--model-base-path", models, *config.export_flags],
        "batch": ["batch", "--model-base-path", models, "--model", "retrieval",
                  "--users", f"synthetic:{batch_users}", "--out", batch],
    }
    logs = folder / "logs"
    logs.mkdir(parents=True)
    for stage, arguments in commands.items():
        size["stages"].append(run_stage(stage, [*CLI, *map(str, arguments)], logs))
        save()
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    if "popularity" not in metrics:
        raise ScaleBenchError("evaluate-retrieval wrote no popularity row (--no-peers in "
                              "--evaluate-flags?): the quality ratio needs it")
    hit, popular = metrics["cascade_retrieval"]["hit_rate@10"], metrics["popularity"]["hit_rate@10"]
    size["quality"] = {"retrieval_hit_rate@10": hit, "popularity_hit_rate@10": popular,
                       "ratio": hit / popular if popular else None}
    summary = json.loads((batch / "_SUMMARY.json").read_text())
    size["batch"] = {key: summary[key] for key in
                     ("model", "users", "users_written", "users_failed", "users_per_second")}
    cascade = _latest(models / "cascade")
    size["cascade_model"] = {"path": str(cascade), "bytes": folder_bytes(cascade)}
    stage, size["serving"] = serve_stage(models, reference, config.requests, logs)
    size["stages"].append(stage)
    save()
    if not config.keep:
        for generated in (data, split, batch):
            shutil.rmtree(generated, ignore_errors=True)


def run_stage(stage: str, command: list[str], logs: pathlib.Path) -> dict:
    """Runs one `cascade` command to the end; its seconds and peak RSS, or ScaleBenchError."""
    log.info("%s: started: %s", stage, " ".join(command))
    started = time.perf_counter()
    process = _launch(command, logs / stage)
    code, peak_gib = _reap(process, logs / stage)
    seconds = time.perf_counter() - started
    if code != 0:
        raise ScaleBenchError(_failure(stage, command, code, logs / f"{stage}.err"))
    log.info("%s: %.1f s, peak RSS %.2f GiB", stage, seconds, peak_gib)
    return {"stage": stage, "seconds": round(seconds, 2), "peak_rss_gib": round(peak_gib, 4),
            "command": command}


def serve_stage(models: pathlib.Path, reference: pathlib.Path | None, requests: int,
                logs: pathlib.Path) -> tuple[dict, dict]:
    """`cascade serve` of `models/cascade` from start to SIGTERM (the stage row) and the p50 of
    one-user Predict calls, paired with `reference/cascade` on a second server when given."""
    targets = {"cascade": models / "cascade"}
    if reference is not None:
        if not (reference / "cascade").is_dir():
            raise ScaleBenchError(f"serve: {reference / 'cascade'} not found (--reference-models)")
        targets["reference"] = reference / "cascade"
    users = {name: known_users(path, requests) for name, path in targets.items()}
    servers = {}
    try:
        if reference is not None:  # up before the stage's own server, so it loads alone
            servers["reference"] = _Server("reference", targets["reference"], logs)
            servers["reference"].wait()
        servers["cascade"] = _Server("serve", targets["cascade"], logs)
        load_seconds = servers["cascade"].wait()
        p50 = paired_p50({name: (s.address, users[name]) for name, s in servers.items()}, requests)
        command = servers["cascade"].command
        stopped = {name: servers.pop(name).stop() for name in list(servers)}
    finally:
        for server in servers.values():  # left running only when something above failed
            server.kill()
    seconds, peak_gib = stopped["cascade"]
    log.info("serve: %.1f s (%.1f s to load), peak RSS %.2f GiB, p50 %.1f ms", seconds,
             load_seconds, peak_gib, p50["cascade"])
    serving = {"model": "cascade", "requests": requests, "load_seconds": round(load_seconds, 2),
               "p50_ms": p50["cascade"]}
    if reference is not None:
        serving["reference"] = {"path": str(reference), "p50_ms": p50["reference"],
                                "peak_rss_gib": round(stopped["reference"][1], 4)}
        serving["p50_over_reference"] = p50["cascade"] / p50["reference"]
    stage = {"stage": "serve", "seconds": round(seconds, 2), "peak_rss_gib": round(peak_gib, 4),
             "command": command}
    return stage, serving


def paired_p50(targets: dict[str, tuple[str, list[str]]], requests: int) -> dict[str, float]:
    """Median ms of `requests` one-user Predict calls to each (address, users), the targets
    taking turns call by call so that both see the same load on the machine."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    stubs = {name: prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))
             for name, (address, _) in targets.items()}
    latencies = {name: [] for name in targets}
    for n in range(-2, requests):  # two warm-up calls each, not counted
        for name, (_, users) in targets.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "cascade"
            request.inputs["user_id"].CopyFrom(tf.make_tensor_proto([users[n % len(users)]]))
            started = time.perf_counter()
            stubs[name].Predict(request, timeout=60)
            if n >= 0:
                latencies[name].append((time.perf_counter() - started) * 1000)
    return {name: float(np.median(values)) for name, values in latencies.items()}


class _Server:
    """`cascade serve` of one model on a free loopback port, its output in `logs/<name>.*`."""

    def __init__(self, name: str, model_dir: pathlib.Path, logs: pathlib.Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.name, self.address, self.logs = name, f"127.0.0.1:{port}", logs / name
        self.command = [*CLI, "serve", "--model-base-path", str(model_dir), "--model_name",
                        "cascade", "--port", str(port), "--rest_api_port", "0",
                        "--file_system_poll_wait_seconds", "0"]
        log.info("%s: started: %s", name, " ".join(self.command))
        self.started = time.perf_counter()
        self.process = _launch(self.command, self.logs)

    def wait(self) -> float:
        """Seconds until the model is AVAILABLE; ScaleBenchError if the server exits first."""
        from serving import client

        deadline = self.started + SERVE_TIMEOUT
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                code, _ = _reap(self.process, self.logs)
                raise ScaleBenchError(_failure(self.name, self.command, code,
                                               self.logs.with_suffix(".err")))
            try:
                client.wait_until_available(self.address, "cascade", timeout=5)
                return time.perf_counter() - self.started
            except TimeoutError:
                continue
        raise ScaleBenchError(f"{self.name}: not AVAILABLE after {SERVE_TIMEOUT:.0f} s: "
                              f"{' '.join(self.command)}")

    def stop(self) -> tuple[float, float]:
        """SIGTERM, then (seconds since start, peak RSS GiB) of the whole server process."""
        self.process.send_signal(signal.SIGTERM)
        code, peak_gib = _reap(self.process, self.logs)
        if code != 0:
            raise ScaleBenchError(_failure(self.name, self.command, code,
                                           self.logs.with_suffix(".err")))
        return time.perf_counter() - self.started, peak_gib

    def kill(self) -> None:
        """The launcher and the server at once (their process group), after a failure."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _launch(command: list[str], logs: pathlib.Path) -> subprocess.Popen:
    """`command` under the launcher, in its own process group, output to `logs`.{out,err}."""
    logs.with_suffix(".rusage").unlink(missing_ok=True)
    with open(logs.with_suffix(".out"), "wb") as out, open(logs.with_suffix(".err"), "wb") as err:
        return subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER,
                                 str(logs.with_suffix(".rusage")), *command],
                                stdout=out, stderr=err, start_new_session=True)


def _reap(process: subprocess.Popen, logs: pathlib.Path) -> tuple[int, float]:
    """Waits for the launcher; (the command's exit code, its peak RSS in GiB)."""
    try:
        process.wait()
    except BaseException:  # e.g. Ctrl-C: the command is in its own session and would run on
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    result = logs.with_suffix(".rusage")
    if process.returncode != 0 or not result.exists():
        return process.returncode or 1, 0.0  # the launcher itself failed: its stderr says why
    code, kib = result.read_text().split()
    return int(code), int(kib) * GIB_PER_KIB


def _failure(stage: str, command: list[str], code: int, stderr: pathlib.Path) -> str:
    tail = stderr.read_text(errors="replace")[-TAIL:] if stderr.exists() else ""
    return (f"stage {stage} failed (exit code {code}): {' '.join(command)}\n"
            f"last lines of {stderr}:\n{tail}")


def _latest(model_dir: pathlib.Path) -> pathlib.Path:
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name))


def known_users(model_dir: pathlib.Path, count: int) -> list[str]:
    """The first `count` users, in ID order, of the run the model's newest version was exported
    from: users it knows, asked as in production."""
    from towers import features, runs

    record = json.loads((_latest(model_dir) / "assets.extra" / "cascade_export.json").read_text())
    tables = features.FeatureTables.load(pathlib.Path(record["run_dir"]) / runs.TABLES_FILE)
    return [str(user) for user in tables.user_ids[:count]]


def folder_bytes(folder: pathlib.Path) -> int:
    """Bytes of every file under `folder` (a SavedModel version: its size on disk)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_results(results: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out / "scale.json", json.dumps(results, indent=2).encode())
    files.write_atomic(out / "scale.md", format_table(results).encode())
    _plot(results, out / "scale.png")


def format_table(results: dict) -> str:
    """One row per (size, stage), then one row of quality, serving and size per size."""
    lines = ["| users | items | interactions | stage | seconds | peak RSS GiB |", "|---" * 6 + "|"]
    for size in results["sizes"]:
        counts = f"{size['users']:,} | {size['items']:,} | {size['interactions']:,}"
        lines += [f"| {counts} | {s['stage']} | {s['seconds']:,.1f} | {s['peak_rss_gib']:.2f} |"
                  for s in size["stages"]]
    lines += ["", "Retrieval hit rate@10 on the synthetic test split vs popularity; `batch` is the "
              "retrieval model (candidate generation); p50 of one-user gRPC Predict calls to "
              "`cascade`, paired with the reference's when given.", "",
              "| users | items | interactions | HR@10 | popularity HR@10 | ratio | batch users/s "
              "| cascade p50 ms | reference p50 ms | p50 / reference | cascade SavedModel MiB |",
              "|---" * 11 + "|"]
    for size in (s for s in results["sizes"] if "serving" in s):
        quality, serving = size["quality"], size["serving"]
        reference = serving.get("reference", {})
        ratio = lambda value, digits: "" if value is None else f"{value:.{digits}f}"
        lines.append(
            f"| {size['users']:,} | {size['items']:,} | {size['interactions']:,} | "
            f"{quality['retrieval_hit_rate@10']:.4f} | {quality['popularity_hit_rate@10']:.4f} | "
            f"{ratio(quality['ratio'], 2)} | {size['batch']['users_per_second']:,.0f} | "
            f"{serving['p50_ms']:.1f} | {ratio(reference.get('p50_ms'), 1)} | "
            f"{ratio(serving.get('p50_over_reference'), 2)} | "
            f"{size['cascade_model']['bytes'] / 2**20:,.1f} |")
    if any("reference" in s.get("serving", {}) for s in results["sizes"]):
        lines += ["", f"Reference: {results['config']['reference_models']}"]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for stage in STAGES:
        points = [(size["interactions"], row) for size in results["sizes"]
                  for row in size["stages"] if row["stage"] == stage]
        if not points:
            continue
        x = [p[0] for p in points]
        axes[0].plot(x, [p[1]["seconds"] for p in points], "o-", label=stage)
        axes[1].plot(x, [p[1]["peak_rss_gib"] for p in points], "o-", label=stage)
    for axis, label in ((axes[0], "wall time (s)"), (axes[1], "peak RSS (GiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("interactions (users and items scaled alike, log scale)")
        axis.set_ylabel(label)
        axis.set_title(f"Each stage's {label} against dataset size")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].axhline(MEMORY_TARGET_GIB, color="red", linestyle="--", linewidth=1)
    axes[1].annotate(f"{MEMORY_TARGET_GIB} GiB target", (0.01, MEMORY_TARGET_GIB),
                     xycoords=("axes fraction", "data"), textcoords="offset points",
                     xytext=(0, 3), color="red", fontsize=8)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    pyplot.close(figure)
    os.replace(staging, path)
