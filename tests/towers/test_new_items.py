"""The new-items view (`cascade evaluate retrieval` under `--split cold-items`): the category
profile baseline worked out by hand, and the new-arrivals shelf on synthetic data whose planted
categories carry part of the preference."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from towers import data, retrieval_eval, runs, synth, train


def test_category_profile_is_the_cosine_of_category_counts(tmp_path):
    """Items a (A), b (A B), c (B), d (C), e (none); user 1 took a, user 2 took c and d.
    User 1's profile is A: cosines 1, 1/sqrt(2), 0, 0, 0. User 2's is B + C: 0, 1/2,
    1/sqrt(2), 1/sqrt(2), 0."""
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\n1\ta\n2\tc\n2\td\n")
    (tmp_path / "x.item").write_text("item_id:token\tgenre:token_seq\na\tA\nb\tA B\nc\tB\nd\tC\ne\t\n")
    (tmp_path / "x.yaml").write_text("text: {categories: genre}\n")
    dataset = data.load(tmp_path)
    tables = types.SimpleNamespace(item_ids=np.array(["a", "b", "c", "d", "e"]))
    seen = np.array([[1, 0, 0, 0, 0], [0, 0, 1, 1, 0]], bool)
    half = 1 / np.sqrt(2)
    np.testing.assert_allclose(retrieval_eval.category_profile_scores(dataset, tables, seen),
                               [[1, half, 0, 0, 0], [0, 0.5, half, half, 0]], atol=1e-6)


def test_content_popularity_is_the_count_predicted_from_categories(tmp_path):
    """Items a (A) taken by 4 users, c (B) by 1; f (A) and g (B) by none. The ridge regression
    (l2 1, intercept free) of log(1 + count) on the categories predicts, worked by hand,
    mean + (x - mean x) . w with w = (0.229, -0.229): 1.3804 for A items, 0.9222 for B items,
    the same for every user; d (no category) gets the mean, 1.1513."""
    (tmp_path / "x.inter").write_text(
        "user_id:token\titem_id:token\n" + "".join(f"{u}\ta\n" for u in range(4)) + "9\tc\n")
    (tmp_path / "x.item").write_text(
        "item_id:token\tgenre:token_seq\na\tA\nc\tB\nf\tA\ng\tB\nd\t\n")
    (tmp_path / "x.yaml").write_text("text: {categories: genre}\n")
    dataset = data.load(tmp_path)
    tables = types.SimpleNamespace(item_ids=np.array(["a", "c", "f", "g", "d"]))
    seen = np.zeros((5, 5), bool)
    seen[:4, 0] = seen[4, 1] = True
    scores = retrieval_eval.content_popularity_scores(dataset, tables, seen)
    np.testing.assert_allclose(scores, np.tile([1.3804, 0.9222, 1.3804, 0.9222, 1.1513], (5, 1)),
                               atol=1e-4)


@pytest.fixture(scope="module")
def cold_run(tiny_config, tmp_path_factory):
    folder = synth.synthesize(tmp_path_factory.mktemp("synth"), 400, 500, 8000, topics=5,
                              progress=False)
    run = tmp_path_factory.mktemp("cold-run")
    train.train(runs.DataConfig(str(folder), split="cold-items"), run, tiny_config, verbose=0)
    return run


def test_new_arrivals_shelf_on_planted_categories(cold_run):
    """Every test item of `cold-items` is new. The planted categories carry preference, so the
    category profile must find new items better than random (1.56x here) on the shelf (a profile built
    from the wrong users, or a shelf that let trained items in, would not); every number is
    recorded in metrics.json."""
    result = retrieval_eval.evaluate_new_items(cold_run)
    dataset, split = runs.run_data(cold_run)
    assert result["new_items"] == len(set(split.test.item_id)) == 100  # 20% of 500 items
    assert result["test_rows"] == len(split.test)
    profile, chance = result["category_profile"], result["random"]
    assert profile["shelf_hit_rate@10"] > 1.3 * chance["shelf_hit_rate@10"]
    # Random's share of new items in a top 10 is about their share of each user's unseen items.
    assert abs(chance["new_share@10"] - 100 / 500) < 0.05
    # The towers read the new items' titles and categories: on the shelf they beat the profile
    # (0.27 vs 0.16 here), and in the full ranking they still prefer trained items.
    assert result["cascade_retrieval"]["shelf_hit_rate@10"] > profile["shelf_hit_rate@10"]
    retrieval_eval.evaluate_run(cold_run, with_peers=False)  # the test table, then the view
    result = retrieval_eval.evaluate_new_items(cold_run)  # again: the same numbers, both kept
    recorded = json.loads((cold_run / runs.METRICS_FILE).read_text())["test"]
    assert recorded["new_items"] == json.loads(json.dumps(result))
    assert recorded["cascade_retrieval"]["hit_rate@10"] == pytest.approx(
        result["cascade_retrieval"]["hit_rate@10"])  # every test item is new here
    table = retrieval_eval.format_new_items(result)
    assert "| category_profile |" in table and "100;" in table.replace(",", "")
    assert result["alike"] is False and "Not computed" not in table and "alike" not in table


def test_without_item_content_the_baselines_say_why_they_are_missing(cold_run, tiny_config,
                                                                     tmp_path):
    """The same interactions with no item file: nothing tells one new item from another, so the
    content baselines are left out (not shown as ties in the item table's order, which looks like
    a result) and the towers' shelf is flagged as chance."""
    dataset, _ = runs.run_data(cold_run)
    rows = dataset.interactions
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "bare.inter").write_text("user_id:token\titem_id:token\n" + "".join(
        f"{u}\t{i}\n" for u, i in zip(rows.user_id, rows.item_id)))
    run = tmp_path / "run"
    train.train(runs.DataConfig(str(folder), split="cold-items"), run, tiny_config, verbose=0)
    result = retrieval_eval.evaluate_new_items(run)
    assert result["new_items"] == 100
    assert set(result) & {"category_profile", "content_popularity"} == set()
    assert result["alike"] is True
    table = retrieval_eval.format_new_items(result)
    assert "| category_profile |" not in table and "| random |" in table
    assert "category_profile (no new item has categories)" in table
    assert "ranks them all alike" in table


def test_a_sample_of_test_users_is_evaluated_on_their_rows_alone(cold_run, tmp_path):
    """`evaluate_run(sample_users=N)` (`cascade evaluate retrieval --sample-users N`): the metrics
    of exactly the test rows of N users drawn with the seed, worked out here from the model's
    own scores, and the sample recorded. Catches a sample that keeps other users' rows, draws
    a different set than it records, or ignores the seed."""
    import shutil

    from towers import metrics, model

    run = tmp_path / "run"
    shutil.copytree(cold_run, run)
    table = retrieval_eval.evaluate_run(run, ks=(10,), with_peers=False, sample_users=7, seed=3)
    retrieval, tables = runs.load_run(run)
    users, items, seen = retrieval_eval.test_rows(tables, runs.run_data(run)[1].test)
    chosen = np.random.default_rng(3).choice(np.unique(users), 7, replace=False)
    keep = np.isin(users, chosen)
    queries, candidates = model.embeddings(retrieval, tables)
    expected = metrics.evaluate(queries @ candidates.T, users[keep], items[keep],
                                seen.toarray().astype(bool), (10,))
    assert table["cascade_retrieval"] == pytest.approx(expected)
    recorded = json.loads((run / runs.METRICS_FILE).read_text())["test_sample"]
    assert recorded == {"users": 7, "of_users": len(np.unique(users)), "rows": int(keep.sum()),
                        "seed": 3}
    assert recorded["rows"] < len(users)
    # The new-items view reads the same sample: its test rows are the sampled users' rows with a
    # new item (every test item is new under cold-items).
    view = retrieval_eval.evaluate_new_items(run, seed=3, sample_users=7)
    assert view["test_rows"] == int(keep.sum()) and view["test_users"] == 7


def test_new_users_view_under_the_temporal_protocol(tiny_config, tmp_path_factory,
                                                    monkeypatch):
    """Under `temporal`, users whose activity starts after the cut have no training row. The view
    covers exactly their test rows; popularity's hit rate is worked out here from the training
    counts (top 10 by count, ties to the lower item row: a new user has nothing to exclude); and
    a split where every user keeps a training row (`user-temporal`) gives None."""
    folder = synth.synthesize(tmp_path_factory.mktemp("late"), 1200, 300, 20000, topics=5,
                              progress=False)
    run = tmp_path_factory.mktemp("temporal-run")
    train.train(runs.DataConfig(str(folder), split="temporal"), run, tiny_config, verbose=0)
    result = retrieval_eval.evaluate_new_users(run)
    _, split = runs.run_data(run)
    new_users = set(split.test.user_id) - set(split.train.user_id)
    rows = np.isin(split.test.user_id, list(new_users))
    assert result["new_users"] == len(new_users) >= 20 and result["test_rows"] == rows.sum()
    _, tables = runs.load_run(run)
    item_row = {item: row for row, item in enumerate(tables.item_ids)}
    counts = np.zeros(len(tables.item_ids))
    np.add.at(counts, [item_row[i] for i in split.train.item_id], 1)
    top = set(np.lexsort((np.arange(len(counts)), -counts))[:10])
    expected = np.mean([item_row[i] in top for i in split.test.item_id[rows]])
    assert result["popularity"] == pytest.approx(expected, abs=1e-9)
    # Trending popularity: the same with each training row weighted by its age at the chosen
    # half-life (chosen on the newest training rows: this catalog has no trend, so all-time
    # counts; a half-life planted in the choice gives the weighted counts' top 10).
    def trending(half_life):
        weights = (np.ones(len(split.train)) if half_life is None else
                   0.5 ** ((split.train.timestamp.max() - split.train.timestamp) / half_life))
        decayed = np.zeros(len(tables.item_ids))
        np.add.at(decayed, [item_row[i] for i in split.train.item_id], weights)
        top = set(np.lexsort((np.arange(len(decayed)), -decayed))[:10])
        return np.mean([item_row[i] in top for i in split.test.item_id[rows]])

    assert result["trending_half_life"] is None
    assert result["trending_popularity"] == pytest.approx(expected, abs=1e-9)
    planted = float(np.ptp(split.train.timestamp)) / 16
    monkeypatch.setattr(retrieval_eval.peers, "choose_half_life", lambda *a, **k: (planted, []))
    decayed = retrieval_eval.evaluate_new_users(run)
    assert decayed["trending_half_life"] == planted
    assert decayed["trending_popularity"] == pytest.approx(trending(planted), abs=1e-9)
    assert trending(planted) != pytest.approx(expected)  # the weighting changes the list here
    assert "half-life" in retrieval_eval.format_new_users(decayed)
    monkeypatch.undo()
    result = retrieval_eval.evaluate_new_users(run)  # what the run records, as before
    assert 0.0 <= result["random"] < 0.2
    recorded = json.loads((run / "metrics.json").read_text())["test"]["new_users"]
    assert recorded == result
    assert "| popularity |" in retrieval_eval.format_new_users(result)

    known_run = tmp_path_factory.mktemp("user-temporal-run")
    train.train(runs.DataConfig(str(folder), split="user-temporal"), known_run, tiny_config,
                verbose=0)
    assert retrieval_eval.evaluate_new_users(known_run) is None
