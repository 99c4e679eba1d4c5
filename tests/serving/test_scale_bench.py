"""`cascade bench scale` end to end at a tiny size: each stage in its own process with its own
figures, the quality and size lines read back from what the stages wrote, serving paired with a
reference, and the two ways it must stop (a bad size before anything runs; a failing stage)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from serving import cli, scale_bench
from tests.conftest import TINY_RERANKER, tiny_copywriter_config

SIZE = {"users": 300, "items": 120, "interactions": 6000}
FOLDER = "u300-i120-n6000"
RETRIEVAL = ("--embedding-dim 16 --id-dim 16 --side-dim 4 --hidden 32 --history-length 32 "
             "--batch-size 128 --learning-rate 1e-2")
# CLI subcommand of each stage, in the order the bench must run them.
SUBCOMMANDS = [("data", "synth"), ("data", "split"), ("train", "retrieval"),
               ("evaluate", "retrieval"), ("train", "reranker"), ("train", "copywriter"),
               ("export",), ("batch",), ("serve",)]


def _flags(values: dict) -> str:
    text = lambda value: str(value).lower() if isinstance(value, bool) else str(value)
    return " ".join(f"--{name.replace('_', '-')} {text(value)}" for name, value in values.items())


def _size_flags() -> list[str]:
    return [f"--{name}={value}" for name, value in SIZE.items()]


@pytest.fixture(scope="module")
def scale_run(tiny_bert_dir, tmp_path_factory):
    """One bench at the tiny size; the reference is its own export (written before serving)."""
    out = tmp_path_factory.mktemp("scale")
    reranker = {k: v for k, v in TINY_RERANKER.items() if k not in ("holdout", "validation_users")}
    copywriter = tiny_copywriter_config()
    defaults = type(copywriter)()
    copy_flags = {f.name: getattr(copywriter, f.name) for f in dataclasses.fields(copywriter)
                  if getattr(copywriter, f.name) != getattr(defaults, f.name)}
    command = [sys.executable, "-m", "serving.cli", "bench", "scale", *_size_flags(),
               "--out", str(out), "--batch-users", "200", "--requests", "10",
               "--reranker-holdout", "400", "--reranker-validation-users", "8",
               "--reference-models", str(out / FOLDER / "models"),
               f"--retrieval-flags={RETRIEVAL}",
               f"--reranker-flags=--checkpoint {tiny_bert_dir} {_flags(reranker)}",
               f"--copywriter-flags={_flags(copy_flags)}", "--export-flags=--k 20 --n 5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "scale.json").read_text())


def test_every_stage_runs_once_in_order_as_its_own_cascade_command(scale_run):
    """A stage skipped, run twice, or run in this process instead of a child would fail here, as
    would peaks taken as a running maximum over the children (they would never go down)."""
    out, results = scale_run
    [size] = results["sizes"]
    assert {key: size[key] for key in SIZE} == SIZE
    assert [row["stage"] for row in size["stages"]] == list(scale_bench.STAGES)
    for row, words in zip(size["stages"], SUBCOMMANDS):
        assert row["command"][:3 + len(words)] == [sys.executable, "-m", "serving.cli", *words]
        assert (out / FOLDER / "logs" / f"{row['stage']}.err").exists()
    peaks = [row["peak_rss_gib"] for row in size["stages"]]
    assert any(later < earlier for earlier, later in zip(peaks, peaks[1:])), peaks
    # The sample options reach the re-ranker's command; the batch is capped at --batch-users.
    reranker = size["stages"][scale_bench.STAGES.index("train-reranker")]["command"]
    assert reranker[reranker.index("--holdout") + 1] == "400"
    # Retrieval was trained without the same 400 rows, so the re-ranker used it as its shadow.
    retrieval = size["stages"][scale_bench.STAGES.index("train-retrieval")]["command"]
    assert retrieval[retrieval.index("--holdout") + 1] == "400"
    assert not (out / FOLDER / "run" / "reranker" / "shadow").exists()
    assert {key: size["batch"][key] for key in ("model", "users", "users_written", "users_failed")
            } == {"model": "retrieval", "users": 200, "users_written": 200, "users_failed": 0}


def test_quality_and_model_size_are_read_from_what_the_stages_wrote(scale_run):
    out, results = scale_run
    [size] = results["sizes"]
    test = json.loads((out / FOLDER / "run" / "metrics.json").read_text())["test"]
    hit, popular = test["cascade_retrieval"]["hit_rate@10"], test["popularity"]["hit_rate@10"]
    assert size["quality"] == {"retrieval_hit_rate@10": hit, "popularity_hit_rate@10": popular,
                               "ratio": pytest.approx(hit / popular)}
    versions = sorted((out / FOLDER / "models" / "cascade").iterdir(), key=lambda p: int(p.name))
    on_disk = sum(os.path.getsize(os.path.join(folder, name))
                  for folder, _, names in os.walk(versions[-1]) for name in names)
    assert size["cascade_model"] == {"path": str(versions[-1]), "bytes": on_disk}
    # Without --keep the generated data goes; the run and the export stay.
    assert sorted(p.name for p in (out / FOLDER).iterdir()) == ["logs", "models", "run"]


def test_serving_is_paired_with_the_reference(scale_run):
    """The reference here is the same export on a second server, asked call by call in turn: the
    served model, the reference's path and the number of calls are those asked for (how fast
    either answers is the benchmark's figure, not a pass/fail condition)."""
    out, results = scale_run
    serving = results["sizes"][0]["serving"]
    assert serving["requests"] == 10
    assert serving["reference"]["path"] == str(out / FOLDER / "models")
    serve = results["sizes"][0]["stages"][-1]["command"]
    assert serve[serve.index("--model-base-path") + 1] == str(out / FOLDER / "models" / "cascade")


def test_table_and_plot_are_written(scale_run):
    out, _ = scale_run
    table = (out / "scale.md").read_text()
    for stage in scale_bench.STAGES:
        assert f"| 300 | 120 | 6,000 | {stage} |" in table
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stage_reports_its_own_peak_not_the_bench_s(tmp_path):
    """At exec, Linux carries the forking process's peak RSS into the child's ru_maxrss: a stage
    spawned straight from a process holding 400 MiB would report at least that. And KiB are
    converted once: 300 MiB written by the child is about 0.3 GiB."""
    import resource

    import numpy as np

    ballast = np.ones(400 * 2**20 // 8)  # written, so resident
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 > 0.4
    small = scale_bench.run_stage("small", [sys.executable, "-c", "pass"], tmp_path)
    big = scale_bench.run_stage("big", [sys.executable, "-c", "b = b'x' * (300 * 2**20)"],
                                tmp_path)
    assert small["peak_rss_gib"] < 0.1
    assert 0.29 < big["peak_rss_gib"] < 0.4
    del ballast


def test_sizes_scale_all_three_counts_smallest_first():
    """--sizes 1,0.01,0.1 of the issue's size: three pipelines, smallest first, each count scaled."""
    config = scale_bench.ScaleConfig(1_000_000, 100_000, 20_000_000, sizes=(1.0, 0.01, 0.1, 0.1))
    assert [(d.users, d.items, d.interactions) for d in scale_bench.sizes(config)] == [
        (10_000, 1_000, 200_000), (100_000, 10_000, 2_000_000), (1_000_000, 100_000, 20_000_000)]


def test_a_bad_size_or_reference_is_refused_before_anything_runs(tmp_path, caplog):
    out = tmp_path / "scale"
    code = cli.main(["bench", "scale", "--users", "300", "--items", "120", "--interactions", "100",
                     "--out", str(out)])
    assert code == 1
    assert "interactions (100) must be at least users (300)" in caplog.text
    assert not out.exists()
    assert cli.main(["bench", "scale", *_size_flags(), "--sizes", "0.5,2", "--out", str(out)]) == 1
    assert "--sizes must be fractions in (0, 1]" in caplog.text
    assert cli.main(["bench", "scale", *_size_flags(), "--out", str(out),
                     "--reference-models", str(tmp_path / "no-models")]) == 1
    assert f"{tmp_path / 'no-models' / 'cascade'}: no cascade model to compare with" in caplog.text
    assert not out.exists()


def test_a_failing_stage_stops_the_bench_naming_it(tmp_path):
    """The retrieval stage gets a flag it does not know: the bench exits 1 with the stage, its
    command and the end of its stderr, keeping the figures of the stages before it."""
    out = tmp_path / "scale"
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "scale", "--users=50", "--items=40",
         "--interactions=500", "--out", str(out), "--retrieval-flags=--no-such-flag 1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "stage train-retrieval failed (exit code 2)" in result.stderr
    assert "serving.cli train retrieval" in result.stderr
    assert "unrecognized arguments: --no-such-flag 1" in result.stderr
    results = json.loads((out / "scale.json").read_text())
    assert [row["stage"] for row in results["sizes"][0]["stages"]] == ["synth", "split"]
