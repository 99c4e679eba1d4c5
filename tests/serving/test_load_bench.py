"""`cascade bench serve` on a tiny export: what it measures and writes, not how fast (timings
belong to the benchmark itself, not to pass/fail tests)."""

from __future__ import annotations

import json

from serving import load_bench


def test_serve_benchmark_writes_every_level(tiny_export, tmp_path):
    """Catches: a level or mode left out, requests lost or counted twice, the JSON, Markdown and
    plot not written from the same rows, the paired run not pairing every request."""
    results = load_bench.run_serve_benchmark(tiny_export, tmp_path, concurrency=(1, 4), requests=12)
    rows = {(r["mode"], r["concurrency"]): r for r in results["rows"]}
    assert set(rows) == {(m, c) for m in load_bench.MODES for c in (1, 4)}
    assert all(row["requests"] == 12 for row in rows.values())
    assert json.loads((tmp_path / "serve.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    table = (tmp_path / "serve.md").read_text()
    assert "| retrieval | grpc+batching | 4 |" in table
    # The paired overhead: one in-process and one gRPC call per request, same users.
    [paired] = results["paired"]
    assert paired["model"] == "retrieval" and paired["pairs"] == 12
    assert "| retrieval | 12 |" in table
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
