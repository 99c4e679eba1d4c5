"""`cascade train copywriter` / `cascade evaluate copywriter` on the tiny retrieval run, and the
copywriter called from inside another `tf.function`, as the one-call cascade SavedModel does."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import tensorflow as tf

from rerank.copy import copywriter, evaluation, graph, grounding, templates
from serving import cli
from towers import runs
from towers import train as towers_train

TINY_FLAGS = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-positions", "320",
              "--vocab-size", "400", "--corpus-size", "400", "--epochs", "2", "--batch-size", "32",
              "--learning-rate", "0.01", "--warmup-steps", "2", "--max-new-tokens", "12",
              "--jit-compile", "false"]


PROGRESS: list[str] = []  # the progress lines `cascade train copywriter` logged in `cli_run`


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        PROGRESS.append(record.getMessage())


@pytest.fixture(scope="module")
def cli_run(tiny_run, tmp_path_factory):
    """A copy of the tiny retrieval run with a copywriter trained through the CLI (its progress
    line, written every minute in a log, here at every step)."""
    run = tmp_path_factory.mktemp("copy-cli") / "run"
    shutil.copytree(tiny_run, run)
    (run.parent / "metrics_before.json").write_bytes((run / "metrics.json").read_bytes())
    logger, handler = logging.getLogger("towers.train"), _Lines(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(towers_train, "PROGRESS_SECONDS", 0.0)
            assert cli.main(["train", "copywriter", "--run", str(run), *TINY_FLAGS]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run


def test_train_copywriter_cli_writes_into_the_retrieval_run(cli_run, tiny_run):
    record = json.loads((cli_run / "copywriter" / "config.json").read_text())
    # Data and split come from the retrieval run (its retrieval_config.json), not the record;
    # the flags reach the config.
    assert not {"data_dir", "train_size"} & set(record)
    split = runs.run_data(tiny_run)[1]
    train_pairs = set(zip(split.train.user_id, split.train.item_id))
    heldout = [json.loads(line) for line in
               (cli_run / "copywriter" / copywriter.HELDOUT_FILE).read_text().splitlines()]
    assert heldout and all((e["user_id"], e["item_id"]) in train_pairs for e in heldout)
    assert (record["n_embd"], record["corpus_size"], record["jit_compile"]) == (32, 400, False)
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert "training" in metrics["copywriter"]
    before = json.loads((cli_run.parent / "metrics_before.json").read_text())
    assert {key: metrics[key] for key in before} == before  # the run's other entries stay
    # Training wrote its progress line (stdout is not a terminal here, as in a log file).
    steps = metrics["copywriter"]["training"]["steps"] // record["epochs"]
    assert any(line.startswith(f"epoch 2: step {steps}/{steps}, loss ") for line in PROGRESS), PROGRESS


def test_evaluate_copywriter_cli_records_metrics_and_a_table(cli_run, capsys):
    """Each served example line is either the generated line, when that line passes the title
    check done here, or exactly the fallback line built here in Python from the item and the
    user's first liked title. Catches: the graph serving an ungrounded generation, falling back
    when the generation was fine and served_generated not agreeing, a fallback naming another
    item or another user's liked title (a wrong gather), or a fallback missing its user part."""
    assert cli.main(["evaluate", "copywriter", "--run", str(cli_run), "--pairs", "30"]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads((cli_run / "metrics.json").read_text())["copywriter"]["evaluation"]
    assert evaluation["pairs"] == 30
    dataset, split = runs.run_data(cli_run)
    catalog = templates.catalog(dataset)
    matcher = grounding.TitleMatcher(catalog)
    reasons = graph.reason_tables(cli_run, dataset, split)
    for example in evaluation["examples"]:
        user, item = example["user_id"], example["item_id"]
        liked = tuple(r.decode() for r in reasons.reasons(tf.constant([user]), tf.constant([item]),
                                                          templates.MAX_LIKED).numpy()[0] if r)
        assert tuple(example["liked"]) == liked
        assert set(example["reasons"]) <= set(liked)
        if example["attempt"] == 0:  # the first sample, served as generated
            assert example["copy"] == example["generated"]
            assert matcher.check(example["generated"], item, liked) == (True, []), example
        elif example["attempt"] < 0:  # no sample passed
            assert example["copy"] == grounding.fallback_line(
                catalog[item], [catalog[i] for i in liked], matcher), example
        else:  # a later sample
            assert example["copy"] != example["generated"]
            assert matcher.check(example["copy"], item, liked) == (True, []), example
    assert evaluation["served_generated"] <= evaluation["grounded_before_check"]
    assert evaluation["graph_check_agrees_with_python"] == 1.0
    assert 0 <= evaluation["hallucinated_title"] <= 1 and evaluation["heldout_perplexity"] > 1
    assert set(evaluation["latency_ms"]) >= {"single_line", "ten_lines_one_user"}
    assert len(evaluation["examples"]) == 20
    assert evaluation["served_claim_errors"] == 0.0
    table = (cli_run / "copywriter" / "evaluation.md").read_text()
    assert f"| grounded_after_check | {evaluation['grounded_after_check']} |" in table
    assert table.strip() in printed


def test_decoding_sweep_on_training_pairs(cli_run):
    """A line's first sample does not depend on how many samples are drawn (its key is the one a
    single sample uses), so the first-sample figures agree across settings that differ only in
    samples, and with one sample every line whose sample fails falls back."""
    rows = evaluation.sweep_decoding(cli_run, grid=((1.0, 40, 1), (1.0, 40, 3)), pairs=16)
    one, three = rows
    assert one["first_sample_passes"] == three["first_sample_passes"]
    assert one["distinct_2_first_sample"] == three["distinct_2_first_sample"]
    assert one["fallback_share"] == round(1 - one["first_sample_passes"], 4)
    table = evaluation.format_sweep(rows)
    assert table.splitlines()[0].startswith("| temperature | top_k | attempts |")
    assert len(table.splitlines()) == 4


def test_train_copywriter_has_no_data_flag(tiny_run):
    """The data is the run's: a `--data` that could disagree with the retrieval run is refused."""
    with pytest.raises(SystemExit):
        cli.main(["train", "copywriter", "--run", str(tiny_run), "--data", str(tiny_run)])


def test_evaluate_copywriter_without_a_copywriter_says_how_to_train(tiny_run, caplog):
    assert cli.main(["evaluate", "copywriter", "--run", str(tiny_run)]) == 1
    assert "cascade train copywriter" in caplog.text


def test_train_copywriter_rejects_a_bad_checkpoint(tiny_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "copywriter", "--run", str(run), "--checkpoint",
                     str(tmp_path / "empty"), *TINY_FLAGS]) == 1
    assert "no tokenizer" in caplog.text
    assert not (run / "copywriter").exists()


def test_serve_inside_another_tf_function(cli_run, tmp_path):
    """The lead's cascade calls `serve` inside its own tf.function on computed item IDs [B, N];
    the copy matches a direct call, and survives a save and load of the outer module."""
    module = graph.CopywriterModule.from_run(cli_run)
    _, _, _, _, split = copywriter.load_run(cli_run)
    users = tf.constant(list(templates.top_items(split.train))[:2])
    items = tf.constant([split.test.item_id[:3].tolist(), split.test.item_id[3:6].tolist()])

    class Outer(tf.Module):
        def __init__(self, copy):
            super().__init__()
            self.copy = copy

        @tf.function(input_signature=[graph.USER_ID, graph.ITEM_IDS])
        def __call__(self, user_id, item_ids):
            chosen = tf.reverse(item_ids, axis=[1])  # computed inside the graph, as top-N is
            return {"copy": self.copy.serve(user_id, chosen)["copy"], "items": chosen}

    outer = Outer(module)
    expected = module.serve(users, tf.reverse(items, axis=[1]))["copy"].numpy()
    assert (outer(users, items)["copy"].numpy() == expected).all()
    tf.saved_model.save(outer, str(tmp_path / "outer"))
    loaded = tf.saved_model.load(str(tmp_path / "outer"))
    assert (loaded(users, items)["copy"].numpy() == expected).all()
    assert expected.shape == (2, 3)
    assert all(line for line in expected.ravel())
