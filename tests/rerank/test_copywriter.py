"""The GPT-2 copywriter: corpus, tokenizer, training, decoding, grounding check, export
(`serving.export.export_copywriter`).

Tiny real models on the tiny MovieLens slice, and a hand-written implicit catalog whose
categories are not MovieLens genres; each test takes seconds."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from rerank.copy import claims, copywriter, decoding, evaluation, graph, grounding, templates
from serving import export
from tests.conftest import tiny_copywriter_config
from towers import data, runs

# Runs in a fresh interpreter that imports only TensorFlow and tensorflow-text: loads the
# exported copywriter and reports its signature and its answers.
PROBE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text
path, users, items = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
fn = tf.saved_model.load(path).signatures["serving_default"]
result = fn(user_id=tf.constant(users), item_ids=tf.constant(items))
print(json.dumps({
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_input_signature[1].items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()},
    "copy": [[s.decode() for s in row] for row in result["copy"].numpy()],
    "reasons": [[[s.decode() for s in pair] for pair in row] for row in result["reasons"].numpy()],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("rerank", "towers", "serving", "transformers", "tf_keras")),
}))
"""

# A tiny implicit catalog (no rating field), its topics no MovieLens genre: i3 has no topic, i5
# no item-file row (its title is its ID), i6 no interaction, and i6's title `noir` is also a
# topic word of i1 (as MovieLens's genre `unknown` is item 267's title). u2 saw i4 twice.
IMPLICIT_INTER = """user_id:token\titem_id:token\ttimestamp:float
u1\ti1\t10
u1\ti2\t20
u1\ti3\t30
u1\ti4\t40
u2\ti2\t15
u2\ti4\t25
u2\ti5\t35
u2\ti4\t45
u2\ti1\t50
"""
IMPLICIT_ITEM = """item_id:token\tname:token_seq\ttopic:token_seq
i1\tQuiet Harbor, The\tjazz Noir gardening
i2\tCopper Lanterns\tAstronomy
i3\tNight Ferry\t
i4\tSalt and Ash\tjazz
i6\tnoir\tpoetry
"""
IMPLICIT_CARD = "text: {title: name, categories: topic}\n"
# By hand: display titles; the user-temporal split (share 0.25) holds out each user's newest
# row (u1-i4 at 40, u2-i1 at 50); liked = the newest training items, each once.
IMPLICIT_TITLES = {"i1": "The Quiet Harbor", "i2": "Copper Lanterns", "i3": "Night Ferry",
                   "i4": "Salt and Ash", "i5": "i5", "i6": "noir"}
IMPLICIT_TRAIN = collections.Counter({("u1", "i1"): 1, ("u1", "i2"): 1, ("u1", "i3"): 1,
                                      ("u2", "i2"): 1, ("u2", "i4"): 2, ("u2", "i5"): 1})
IMPLICIT_LIKED = {"u1": ("i3", "i2", "i1"), "u2": ("i4", "i5", "i2")}


@pytest.fixture(scope="module")
def tiny_split(tiny_data_dir):
    """The tiny slice and its default split, the one `tiny_run` was trained on."""
    dataset = data.load(tiny_data_dir)
    return dataset, dataset.split()


@pytest.fixture(scope="module")
def tiny_copy_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("copy-run") / "run"
    shutil.copytree(tiny_run, run)
    result = copywriter.train_copywriter(run, tiny_copywriter_config(), verbose=0)
    return run, result


@pytest.fixture(scope="module")
def implicit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("implicit")
    (folder / "x.inter").write_text(IMPLICIT_INTER)
    (folder / "x.item").write_text(IMPLICIT_ITEM)
    (folder / "x.yaml").write_text(IMPLICIT_CARD)
    dataset = data.load(folder)
    return dataset, dataset.split("user-temporal", test_share=0.25)


def _item(items: dict[str, data.ItemFacts], title: str) -> str:
    return next(i for i, item in items.items() if item.title == title)


def test_display_titles_and_era():
    assert grounding.display_title("Usual Suspects, The") == "The Usual Suspects"
    assert grounding.display_title("Postino, Il") == "Il Postino"
    assert (grounding.display_title("City of Lost Children, The (Cité des enfants perdus, La)")
            == "The City of Lost Children (Cité des enfants perdus, La)")
    assert grounding.display_title("Toy Story") == "Toy Story"
    assert templates.era("1995") == "mid-'90s" and templates.era("1961") == "early-'60s"


def test_title_matcher_respects_words_and_longest_titles(movielens):
    items = templates.catalog(movielens)
    matcher = grounding.TitleMatcher(items)
    assert matcher.titles_in("Primal Fear beats Fear.") == ["Primal Fear", "Fear"]
    assert matcher.titles_in("No fear; Heather and Jaws 2 wait.") == ["Jaws 2"]
    assert matcher.titles_in("It's a Wonderful Life") == ["It's a Wonderful Life"]
    fear = _item(items, "Fear")
    primal = _item(items, "Primal Fear")
    assert matcher.check("Try Primal Fear.", fear, ()) == (False, ["Primal Fear"])
    assert matcher.check("After Primal Fear, Fear.", fear, (primal,)) == (True, [])


def test_title_index_finds_every_title_a_full_scan_finds(movielens):
    """The prefix index hands the passes the same titles, in the same order, as a scan of every
    title: one dropping titles shorter than its prefix (`Fear`, `M`), or a title met at the end
    of a text, fails here."""
    matcher = grounding.TitleMatcher(templates.catalog(movielens))
    rng = np.random.default_rng(0)
    texts = ["Primal Fear beats Fear.", "Babe", "Heat and Jaws 2", "It's a Wonderful Life"]
    for _ in range(200):
        titles = rng.choice(matcher.titles, size=rng.integers(1, 4))
        texts.append(" and ".join(t[int(rng.integers(0, 3)):] for t in titles))
    for text in texts:
        assert matcher._present(text) == [[t for t in chunk if t in text]
                                          for chunk in matcher.chunks], text


def test_movielens_prompts_and_fallbacks_keep_their_words(movielens):
    """ML-100K's prompt and fallback text as before the data layer (written by hand): a port that
    drops the year, the categories' order or MovieLens's `unknown` rule fails here."""
    items = templates.catalog(movielens)
    matcher = grounding.TitleMatcher(items)
    assert (templates.film_piece(items["1"])
            == " Film:<|title|> Toy Story (1995). Genres: Animation, Children's, Comedy. Copy:")
    assert templates.liked_piece(items["12"], 1) == "<|liked2|> The Usual Suspects;"
    assert (grounding.fallback_line(items["1"], [items["12"]], matcher)
            == "Toy Story (1995): animation, children's, comedy. "
               "Picked for fans of The Usual Suspects.")
    # Genre `unknown` is item 267's title: the fallback leaves it out, as the copy does.
    assert grounding.item_fallback(items["267"], matcher) == "unknown."
    assert grounding.item_fallback(items["1373"], matcher) == "Good Morning (1971)."


def test_explicit_liked_items_are_the_best_rated():
    """Ratings of 4 or more, by rating, then the most recent, then item ID; below 4, nothing."""
    rows = data.Interactions(np.array(["a", "a", "a", "a", "b", "b", "c"]),
                             np.array(["x", "y", "z", "w", "q", "p", "v"]),
                             np.array([5, 5, 4, 3, 4, 4, 2], np.float32),
                             np.array([1, 2, 3, 4, 5, 5, 6], np.int64))
    assert templates.top_items(rows) == {"a": ("y", "x", "z"), "b": ("p", "q")}
    assert templates.top_items(rows, 2) == {"a": ("y", "x"), "b": ("p", "q")}


def test_corpus_is_deterministic_grounded_and_from_training_rows(tiny_split):
    dataset, split = tiny_split
    corpus = templates.build_corpus(dataset, split.train, 300, seed=7)
    assert corpus == templates.build_corpus(dataset, split.train, 300, seed=7)
    assert corpus != templates.build_corpus(dataset, split.train, 300, seed=8)
    pairs = set(zip(split.train.user_id, split.train.item_id))
    best = templates.top_items(split.train)
    matcher = grounding.TitleMatcher(templates.catalog(dataset))
    for example in corpus:
        assert (example.user_id, example.item_id) in pairs
        assert set(example.liked) <= set(best.get(example.user_id, ())) - {example.item_id}
        assert len(example.liked) <= templates.MAX_LIKED
        assert matcher.check(example.target, example.item_id, example.liked) == (True, [])
    assert evaluation.distinct_n([e.target for e in corpus], 2) > 0.4


def test_every_fallback_line_is_grounded(movielens):
    items = templates.catalog(movielens)
    matcher = grounding.TitleMatcher(items)
    ids = list(items)
    for item_id, liked in zip(ids, ids[1:] + ids[:1]):
        line = grounding.fallback_line(items[item_id], [items[liked]], matcher)
        assert matcher.check(line, item_id, (liked,)) == (True, []), line


def test_implicit_catalog_likes_the_newest_training_items(implicit):
    """Implicit feedback has rating 1 everywhere: with the explicit 4-star rule nobody likes
    anything; here the newest training items are liked, a repeated item once."""
    dataset, split = implicit
    assert dataset.implicit
    assert collections.Counter(zip(split.train.user_id, split.train.item_id)) == IMPLICIT_TRAIN
    assert templates.top_items(split.train, implicit=True) == IMPLICIT_LIKED
    assert templates.top_items(split.train, 2, implicit=True) == {
        "u1": ("i3", "i2"), "u2": ("i4", "i5")}


def test_implicit_catalog_prompts_and_fallback_lines(implicit):
    """Facts of any catalog: no year, topics that are no MovieLens genre, no topic, no item row;
    a topic word that is a title (`noir`) is never said."""
    dataset, _ = implicit
    items = templates.catalog(dataset)
    matcher = grounding.TitleMatcher(items)
    assert (templates.film_piece(items["i1"])
            == " Film:<|title|> The Quiet Harbor. Genres: jazz, Noir, gardening. Copy:")
    assert templates.film_piece(items["i3"]) == " Film:<|title|> Night Ferry. Copy:"
    assert templates.film_piece(items["i5"]) == " Film:<|title|> i5. Copy:"
    pairs = (("i1", "i4"), ("i2", None), ("i3", "i1"), ("i5", None), ("i6", "i2"))
    fallback = {item: grounding.fallback_line(items[item], [items[liked]] if liked else [],
                                                matcher) for item, liked in pairs}
    assert fallback == {
        "i1": "The Quiet Harbor: jazz, gardening. Picked for fans of Salt and Ash.",
        "i2": "Copper Lanterns: astronomy.",
        "i3": "Night Ferry. Picked for fans of The Quiet Harbor.",
        "i5": "i5.",
        "i6": "noir: poetry. Picked for fans of Copper Lanterns.",
    }


def test_implicit_catalog_phrases_its_own_categories():
    """A category GENRE_WORDS does not know is phrased with its own word, not a KeyError; an item
    without categories still gets a phrase."""
    jazz = data.ItemFacts("i4", "Salt and Ash", data.UNKNOWN_YEAR, ("jazz",))
    astronomy = data.ItemFacts("i2", "Copper Lanterns", data.UNKNOWN_YEAR, ("Astronomy",))
    bare = data.ItemFacts("i3", "Night Ferry", data.UNKNOWN_YEAR, ())
    nouns = {"film", "movie", "oddity"}
    for seed in range(30):
        phrase, with_article = templates.category_phrase(jazz, random.Random(seed))
        assert phrase.startswith("jazz ") and with_article == "a " + phrase, phrase
        phrase, with_article = templates.category_phrase(astronomy, random.Random(seed))
        assert phrase.startswith("astronomy ") and with_article == "an " + phrase, phrase
        phrase, _ = templates.category_phrase(bare, random.Random(seed))
        assert phrase in nouns or phrase.split()[0] in {"offbeat", "curious"}, phrase


def test_implicit_catalog_corpus_names_the_real_titles(implicit):
    """Every training row once; each line names its item's title and no title outside the prompt
    (plain substrings of the titles written above), and the liked titles are the user's."""
    dataset, split = implicit
    corpus = templates.build_corpus(dataset, split.train, len(split.train), seed=3)
    assert collections.Counter((e.user_id, e.item_id) for e in corpus) == IMPLICIT_TRAIN
    for example in corpus:
        assert set(example.liked) <= set(IMPLICIT_LIKED[example.user_id]) - {example.item_id}
        assert IMPLICIT_TITLES[example.item_id] in example.target, example.target
        for other, title in IMPLICIT_TITLES.items():
            if other != example.item_id and other not in example.liked:
                assert title not in example.target, example.target
        for liked in example.liked:  # a liked title is in the copy exactly when its slot is
            slot = templates.LIKED_SLOTS[example.liked.index(liked)]
            assert (IMPLICIT_TITLES[liked] in example.target) == (slot in example.template)
        assert "<|" not in example.target
    assert any(example.liked for example in corpus)  # the bug: nobody likes anything


def test_tokenizer_round_trips_in_the_graph():
    texts = ["Toy Story (1995) is a funny animated feature.", "Á köldum klaka (Cold Fever): drama.",
             "Les Misérables, made in 1995; don't miss it!"]
    tokenizer = copywriter.train_tokenizer(texts * 20, vocab_size=300)
    ids = tokenizer(texts + ["Zébulon 😀 unseen words"], add_special_tokens=False)["input_ids"]
    slot_ids = tokenizer.convert_tokens_to_ids(list(templates.SLOTS))
    detokenize = graph.Detokenizer(tokenizer, slot_ids)
    eos = tokenizer.eos_token_id
    width = max(map(len, ids)) + 2
    padded = tf.constant([row + [eos] * (width - len(row)) for row in ids])
    decoded = [s.decode() for s in detokenize(padded).numpy()]
    assert decoded == texts + ["Zébulon 😀 unseen words"]
    assert [tokenizer.decode(row) for row in ids] == decoded
    # Slot tokens are single tokens, and become their row's title with its leading space.
    template = "<|title|> is for fans of<|liked2|>."
    ids = tokenizer([template], add_special_tokens=False)["input_ids"]
    assert ids[0][0] == slot_ids[0] and slot_ids[2] in ids[0]
    titles = tf.constant([[" Toy Story", " Heat", " Fargo", ""]])
    assert detokenize(tf.constant(ids), titles).numpy()[0].decode() == "Toy Story is for fans of Fargo."
    item = data.ItemFacts("1", "Toy Story", "1995", ("Comedy",))
    liked = [data.ItemFacts("2", "Heat", "1995", ("Crime",)),
             data.ItemFacts("3", "Fargo", "1996", ("Crime",))]
    assert templates.lexicalize(template, item, liked) == "Toy Story is for fans of Fargo."


def test_training_lowers_the_loss_and_writes_the_run(tiny_copy_run, tiny_run):
    run, result = tiny_copy_run
    assert result["loss"][-1] < result["loss"][0] - 0.5
    folder = run / copywriter.SUBDIR
    # GPT-2's count worked out from the config: token (tied with the output layer) and position
    # tables, 12 d^2 + 13 d per layer, the final layer norm
    config, vocab = tiny_copywriter_config(), len(copywriter.load_tokenizer(folder / "model"))
    d = config.n_embd
    assert result["parameters"] == ((vocab + config.n_positions) * d
                                    + config.n_layer * (12 * d * d + 13 * d) + 2 * d)
    # held-out perplexity below the uniform guess over the vocabulary's tokens
    assert 1 < result["heldout_perplexity"] < vocab / 4
    assert (folder / "model" / "config.json").is_file() and (folder / "model" / "tokenizer.json").is_file()
    record = json.loads((folder / "config.json").read_text())
    assert record["n_embd"] == tiny_copywriter_config().n_embd
    assert not {"data_dir", "train_size"} & set(record)  # the run's retrieval_config.json has them
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["copywriter"]["training"]["loss"] == result["loss"]
    # The corpus came from the run's training rows: every held-out example is one.
    heldout = [json.loads(line)
               for line in (folder / copywriter.HELDOUT_FILE).read_text().splitlines()]
    split = runs.run_data(tiny_run)[1]
    train_pairs = set(zip(split.train.user_id, split.train.item_id))
    assert heldout and all((e["user_id"], e["item_id"]) in train_pairs for e in heldout)


def test_decoder_matches_transformers_greedy():
    config = copywriter.CopywriterConfig(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                         top_k=1, repetition_penalty=1.0, max_new_tokens=6)
    tf.keras.utils.set_random_seed(0)
    model = copywriter.build_model(config, vocab_size=50, eos_id=0)
    decoder = decoding.Decoder(model, config, eos_id=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids = tf.constant([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = tf.constant([[1, 1, 1, 1], [0, 0, 1, 1]])
    tokens, _ = tf.function(decoder.generate)(ids, mask, tf.constant(["a", "b"]))
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        for _ in range(tokens.shape[1]):
            logits = model(tf.constant([sequence]), training=False).logits[0, -1]
            sequence.append(int(tf.argmax(logits)))
        expected = sequence[len(prompt):]
        if 0 in expected:  # after EOS the decoder pads with EOS
            expected = expected[:expected.index(0)] + [0] * (len(expected) - expected.index(0))
        assert tokens[row].numpy().tolist() == expected


def test_grounding_check_and_fallback_in_the_graph(tiny_copy_run, tiny_split):
    run, _ = tiny_copy_run
    dataset, split = tiny_split
    items = templates.catalog(dataset)
    module = graph.CopywriterModule.from_run(run)
    matcher = grounding.TitleMatcher(items)
    fear, fargo = _item(items, "Fear"), _item(items, "Fargo")
    rows = tf.constant([module.item_rows.lookup(tf.constant(fear)).numpy()] * 4)
    liked = tf.ragged.constant([[module.item_rows.lookup(tf.constant(fargo)).numpy()], [], [], []])
    texts = tf.constant(["Fans of Fargo: Fear.", "Fear and Fargo.", "Primal Fear!", "no fear"])
    present, foreign = module._grounding(texts, rows, liked)
    assert present.numpy().tolist() == [True, True, False, False]
    assert foreign.numpy().tolist() == [False, True, True, False]
    # Served copy: generated when it passes every check, else the fallback; every line grounded,
    # its reasons the liked history items with the largest positive weights towards the item.
    users = list(templates.top_items(split.train))[:3]
    chosen = [list(split.test.item_id[:4])] * 3
    out = module.details(tf.constant(users), tf.constant(chosen))
    for b, user in enumerate(users):
        for n, item in enumerate(chosen[b]):
            served = out["copy"][b, n].numpy().decode()
            liked_ids = _reasons_by_hand(module.reasons, user, item)
            assert [r.decode() for r in out["candidate_reasons"][b, n].numpy() if r] == liked_ids
            facts = grounding.spoken(items[item], matcher)
            frame_ok, wrong = claims.check_template(out["skeleton"][b, n].numpy().decode(), facts)
            ok = bool(out["title_present"][b, n] and not out["other_title"][b, n]
                      and out["finished"][b, n] and out["slots_ok"][b, n]) and frame_ok and not wrong
            # The first sample is served when it passes; else a later sample that passes (none
            # of whose claims is false); else the fallback.
            attempt = int(out["attempt"][b, n])
            assert (attempt == 0) == ok
            fallback = grounding.fallback_line(
                items[item], [items[liked_ids[0]]] if liked_ids else [], matcher)
            if attempt == 0:
                assert served == out["generated"][b, n].numpy().decode()
            elif attempt < 0:
                assert served == fallback
            else:
                assert served != fallback and not any(claims.find_claims(
                    served, facts, [items[i] for i in liked_ids],
                    claims.claim_vocabulary(items.values())).values())
            assert matcher.check(served, item, liked_ids) == (True, [])
            cited = [r.decode() for r in out["reasons"][b, n].numpy() if r]
            assert set(cited) <= set(liked_ids)
            for reason in liked_ids:  # the line names exactly the reasons it returns
                title = grounding.display_title(items[reason].title)
                assert (title in served) == (reason in cited), (served, cited)


def test_the_first_sample_that_passes_is_served():
    """Three lines, two samples each (attempt-major): the second sample of line 0, the first of
    line 1 (its second passes too), none of line 2 (the fallback; row of its first sample)."""
    passed = tf.constant([False, True, False, True, True, False])
    attempt, chosen = graph.first_passing(passed, 2)
    assert attempt.numpy().tolist() == [1, 0, -1]
    assert chosen.numpy().tolist() == [3, 1, 2]
    attempt, chosen = graph.first_passing(tf.constant([False, True]), 1)
    assert attempt.numpy().tolist() == [-1, 0] and chosen.numpy().tolist() == [0, 1]


def _reasons_by_hand(texts, user: str, item: str) -> list[str]:
    """The user's liked history items with positive weight towards `item`, largest first."""
    arrays = texts.arrays
    row = list(arrays["user_ids"]).index(user)
    span = slice(arrays["history_splits"][row], arrays["history_splits"][row + 1])
    column = list(arrays["item_ids"]).index(item)
    weights = texts.neighbours().matrix()[:, column].toarray().ravel()
    history = arrays["history_values"][span][arrays["history_liked"][span]]
    ranked = sorted(((weights[j], j) for j in history if weights[j] > 0), key=lambda p: (-p[0], p[1]))
    return [str(arrays["item_ids"][j]) for _, j in ranked[:templates.MAX_LIKED]]


def test_export_round_trip_in_a_fresh_process(tiny_copy_run, tiny_split, tmp_path):
    run, _ = tiny_copy_run
    dataset, split = tiny_split
    items = templates.catalog(dataset)
    path = export.export_copywriter(run, tmp_path / "models")
    assert path == tmp_path / "models" / "copywriter" / "1"
    assert tf.saved_model.load(str(path)).salt.numpy() == 1  # the version salts the sampling key
    assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert "copywriter" in (tmp_path / "models" / "models.config").read_text()
    users = [str(split.train.user_id[0]), "not-a-user"]
    chosen = [[split.test.item_id[0], split.test.item_id[1], "no-such-item"],
              [split.test.item_id[2], "", split.test.item_id[3]]]
    chosen = [[str(item) for item in row] for row in chosen]
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(users),
                             json.dumps(chosen)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert out["inputs"] == {"user_id": ["string", [None]], "item_ids": ["string", [None, None]]}
    assert out["outputs"] == {"copy": ["string", [None, None]],
                              "reasons": ["string", [None, None, 2]]}
    assert out["copy"][0][2] == "" and out["copy"][1][1] == ""
    # the fresh process writes the lines the same SavedModel writes in this one (the fallback
    # line is grounded too: grounding alone would not tell the model's lines from it)
    here = tf.saved_model.load(str(path)).signatures["serving_default"](
        user_id=tf.constant(users), item_ids=tf.constant(chosen))
    assert out["copy"] == here["copy"].numpy().astype(str).tolist()
    assert out["reasons"] == here["reasons"].numpy().astype(str).tolist()
    matcher = grounding.TitleMatcher(items)
    for b, user in enumerate(users):
        for n, item in enumerate(chosen[b]):
            if item in items:
                cited = [r for r in out["reasons"][b][n] if r]
                assert matcher.check(out["copy"][b][n], item, cited) == (True, [])


def test_local_gpt2_directory_loads_and_fine_tunes(tiny_run, tmp_path):
    import safetensors.numpy
    import transformers
    from transformers import modeling_tf_pytorch_utils as convert

    import tokenizers

    # A tokenizer of GPT-2's kind without the slot tokens, as a checkpoint from elsewhere has.
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Toy Story is a comedy; Heat is a tense thriller."] * 10, 300,
                            special_tokens=[copywriter.EOS], show_progress=False)
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,
                                               eos_token=copywriter.EOS)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32,
                                     n_layer=2, n_head=2)
    model = transformers.TFGPT2LMHeadModel(config)
    model(model.dummy_inputs)
    ids = tf.constant([[3, 4, 5, 6]])
    expected = model(ids).logits.numpy()
    keras_dir, torch_dir = tmp_path / "keras", tmp_path / "torch"
    model.save_pretrained(str(keras_dir))
    tokenizer.save_pretrained(str(keras_dir))
    # The PyTorch layout of the same weights (GPT-2's Conv1D keeps [in, out], no transpose).
    state = {}
    for weight in model.weights:
        name, _ = convert.convert_tf_weight_name_to_pt_weight_name(weight.name, tf_weight_shape=weight.shape)
        state[name] = weight.numpy()
    torch_dir.mkdir()
    safetensors.numpy.save_file(state, str(torch_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(torch_dir))
    for directory in (keras_dir, torch_dir):
        loaded = copywriter.load_gpt2(directory)
        np.testing.assert_allclose(loaded(ids).logits.numpy(), expected, atol=1e-5)
    del state["transformer.h.1.mlp.c_fc.weight"]
    safetensors.numpy.save_file(state, str(torch_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(copywriter.CopywriterError, match="does not match"):
        copywriter.load_gpt2(torch_dir)
    with pytest.raises(copywriter.CopywriterError, match="no tokenizer"):
        copywriter.load_tokenizer(torch_dir)
    config = copywriter.CopywriterConfig(corpus_size=100, epochs=1, batch_size=32,
                                         max_new_tokens=8, jit_compile=False)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = copywriter.train_copywriter(run, config, checkpoint=keras_dir, verbose=0)
    # Fine-tuned with the four slot tokens added to its vocabulary.
    assert result["parameters"] == model.count_params() + len(templates.SLOTS) * 32
    assert result["checkpoint"] == str(keras_dir)


def test_train_copywriter_without_a_retrieval_run_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade train retrieval"):
        copywriter.train_copywriter(tmp_path / "empty", tiny_copywriter_config(), verbose=0)
