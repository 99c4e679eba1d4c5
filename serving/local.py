"""Answers from an exported `retrieval` or `cascade` SavedModel loaded in this process (no server
needed)."""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the tokenizer ops the exports use

from serving import export
from towers import data, runs


def latest_version(model_dir: pathlib.Path) -> pathlib.Path:
    """The highest integer version under `model_dir`, as TF Serving's default policy picks it."""
    versions = sorted((p for p in model_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no version directory; run `cascade export` first")
    return versions[-1]


def recommend(model_base_path: str | os.PathLike, user_ids: list[str], top: int = 10,
              model: str = "retrieval") -> dict:
    """{user_id: [{item_id, title, score[, retrieval_score, copy]}, ...]} from the latest version
    of `model` (`retrieval` or `cascade`)."""
    version = latest_version(pathlib.Path(model_base_path) / model)
    record = json.loads((version / "assets.extra" / export.RECORD_FILE).read_text())
    if record.get("index") == "scann":
        import scann  # noqa: F401  registers the ScaNN ops the SavedModel uses
    serve = tf.saved_model.load(str(version)).signatures[export.SIGNATURE]
    outputs = {k: v.numpy() for k, v in serve(user_id=tf.constant(user_ids)).items()}
    source = runs.data_config(record["run_dir"])
    return answers(user_ids, outputs, catalog_titles(data.load(source.data_dir, source.card)), top)


def catalog_titles(dataset: data.Dataset) -> dict[str, str]:
    """item_id -> display label (`Title (year)`) of every item in the dataset."""
    item_ids = dataset.item_ids()
    return dict(zip(item_ids, dataset.labels(item_ids)))


def answers(user_ids: list[str], outputs: dict, titles: dict[str, str] | None, top: int) -> dict:
    """Shapes `retrieval` outputs (item_ids [B, K], scores [B, K]) or `cascade` outputs (also
    titles, retrieval_scores and copy [B, N]) as one list per user."""
    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    result = {}
    for b, user in enumerate(user_ids):
        rows = []
        for j, item in enumerate(list(outputs["item_ids"][b])[:top]):
            item = text(item)
            row = {"item_id": item, "title": (text(outputs["titles"][b][j]) if "titles" in outputs
                                              else (titles or {}).get(item, "")),
                   "score": float(outputs["scores"][b][j])}
            if "retrieval_scores" in outputs:
                row["retrieval_score"] = float(outputs["retrieval_scores"][b][j])
            if "sources" in outputs:  # the candidate source that put the item in the list
                row["source"] = text(outputs["sources"][b][j])
            if "copy" in outputs:
                row["copy"] = text(outputs["copy"][b][j])
            if "reasons" in outputs:
                row["reasons"] = [text(r) for r in outputs["reasons"][b][j] if text(r)]
            rows.append(row)
        result[user] = rows
    return result
