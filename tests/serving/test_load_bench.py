"""`cascade bench serve` on a tiny export: what it measures and writes, not how fast. The
in-process function is slowed by a known 20 ms sleep, so its latency, QPS and scaling with
concurrency have expected values."""

from __future__ import annotations

import json
import time

from serving import load_bench

SLEEP_S = 0.02


def test_serve_benchmark_writes_every_level(tiny_export, tmp_path, monkeypatch):
    """Catches: latencies recorded in seconds (or microseconds) as ms, QPS from the wrong count
    or time (per worker, or requests / summed latency, which does not grow with concurrency),
    in-process workers serialised by a lock held during the call (QPS flat in concurrency), and
    percentiles of the wrong rows."""
    load = load_bench._load

    def slowed(model_dir):
        fn = load(model_dir)

        def call(**inputs):
            time.sleep(SLEEP_S)  # releases the GIL, as the TF runtime does
            return fn(**inputs)
        return call

    monkeypatch.setattr(load_bench, "_load", slowed)
    results = load_bench.run_serve_benchmark(tiny_export, tmp_path, concurrency=(1, 4), requests=12)
    rows = {(r["mode"], r["concurrency"]): r for r in results["rows"]}
    assert set(rows) == {(m, c) for m in load_bench.MODES for c in (1, 4)}
    assert all(row["requests"] == 12 for row in rows.values())
    single, four = rows[("in-process", 1)], rows[("in-process", 4)]
    # One call at a time: every call takes 20 ms and a few ms of TF, so at most 50 QPS.
    assert 1000 * SLEEP_S <= single["p50_ms"] < 1000 * SLEEP_S + 30
    assert 1 / (SLEEP_S + 0.03) < single["qps"] <= 1 / SLEEP_S
    # Four callers overlap their sleeps: well over twice the throughput.
    assert four["qps"] > 2 * single["qps"] and four["p50_ms"] >= 1000 * SLEEP_S
    # Over gRPC, one call at a time: QPS is about 1 / latency (ms and seconds not mixed up).
    for mode in ("grpc", "grpc+batching"):
        row = rows[(mode, 1)]
        assert 0.3 < row["qps"] * row["p50_ms"] / 1000 < 1.5, row
    assert json.loads((tmp_path / "serve.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    table = (tmp_path / "serve.md").read_text()
    assert "| retrieval | grpc+batching | 4 |" in table
    # The paired overhead: one in-process and one gRPC call per request, same users.
    [paired] = results["paired"]
    assert paired["model"] == "retrieval" and paired["pairs"] == 12
    assert 1000 * SLEEP_S <= paired["in_process_p50_ms"] < 1000 * SLEEP_S + 30
    assert "| retrieval | 12 |" in table
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
