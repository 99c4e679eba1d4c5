"""The GPT-2 copywriter: corpus, tokenizer, training, decoding, grounding check, export.

Tiny real models on the tiny MovieLens slice; each test takes seconds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from rerank import copy_corpus, copywriter, copywriter_export
from towers import data

TINY_TRAIN = 2_400
TINY = copywriter.CopywriterConfig(
    n_layer=1, n_embd=32, n_head=2, n_positions=320, vocab_size=400, corpus_size=400, epochs=3, batch_size=32,
    learning_rate=1e-2, warmup_steps=2, max_new_tokens=12, jit_compile=False)

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
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("rerank", "towers", "serving", "transformers", "tf_keras")),
}))
"""


@pytest.fixture(scope="module")
def tiny_split(tiny_data_dir):
    movielens = data.load_movielens(tiny_data_dir)
    return movielens, data.benchmark_split(movielens.ratings, train_size=TINY_TRAIN)


@pytest.fixture(scope="module")
def tiny_copy_run(tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("copy-run")
    result = copywriter.train_copywriter(run, tiny_data_dir, TINY, train_size=TINY_TRAIN, verbose=0)
    return run, result


def _item(movielens, title: str) -> str:
    return next(i for i, item in movielens.items.items() if item.title == title)


def test_display_titles_and_era():
    assert copy_corpus.display_title("Usual Suspects, The") == "The Usual Suspects"
    assert copy_corpus.display_title("Postino, Il") == "Il Postino"
    assert (copy_corpus.display_title("City of Lost Children, The (Cité des enfants perdus, La)")
            == "The City of Lost Children (Cité des enfants perdus, La)")
    assert copy_corpus.display_title("Toy Story") == "Toy Story"
    assert copy_corpus.era("1995") == "mid-'90s" and copy_corpus.era("1961") == "early-'60s"


def test_title_matcher_respects_words_and_longest_titles(movielens):
    matcher = copy_corpus.TitleMatcher(movielens.items)
    assert matcher.titles_in("Primal Fear beats Fear.") == ["Primal Fear", "Fear"]
    assert matcher.titles_in("No fear; Heather and Jaws 2 wait.") == ["Jaws 2"]
    assert matcher.titles_in("It's a Wonderful Life") == ["It's a Wonderful Life"]
    fear = _item(movielens, "Fear")
    primal = _item(movielens, "Primal Fear")
    assert matcher.check("Try Primal Fear.", fear, ()) == (False, ["Primal Fear"])
    assert matcher.check("After Primal Fear, Fear.", fear, (primal,)) == (True, [])


def test_corpus_is_deterministic_grounded_and_from_training_rows(tiny_split):
    movielens, split = tiny_split
    corpus = copy_corpus.build_corpus(movielens, split.train, 300, seed=7)
    assert corpus == copy_corpus.build_corpus(movielens, split.train, 300, seed=7)
    assert corpus != copy_corpus.build_corpus(movielens, split.train, 300, seed=8)
    pairs = set(zip(split.train.user_id, split.train.item_id))
    best = copy_corpus.top_items(split.train)
    matcher = copy_corpus.TitleMatcher(movielens.items)
    for example in corpus:
        assert (example.user_id, example.item_id) in pairs
        assert set(example.liked) <= set(best.get(example.user_id, ())) - {example.item_id}
        assert len(example.liked) <= copy_corpus.MAX_LIKED
        assert matcher.check(example.target, example.item_id, example.liked) == (True, [])
    assert copy_corpus.distinct_n([e.target for e in corpus], 2) > 0.4


def test_every_fallback_line_is_grounded(movielens):
    matcher = copy_corpus.TitleMatcher(movielens.items)
    ids = list(movielens.items)
    for item_id, liked in zip(ids, ids[1:] + ids[:1]):
        line = copy_corpus.fallback_line(movielens.items[item_id], [movielens.items[liked]])
        assert matcher.check(line, item_id, (liked,)) == (True, []), line


def test_tokenizer_round_trips_in_the_graph():
    texts = ["Toy Story (1995) is a funny animated feature.", "Á köldum klaka (Cold Fever): drama.",
             "Les Misérables, made in 1995; don't miss it!"]
    tokenizer = copywriter.train_tokenizer(texts * 20, vocab_size=300)
    ids = tokenizer(texts + ["Zébulon 😀 unseen words"], add_special_tokens=False)["input_ids"]
    slot_ids = tokenizer.convert_tokens_to_ids(list(copy_corpus.SLOTS))
    detokenize = copywriter_export.Detokenizer(tokenizer, slot_ids)
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
    item = data.Item("1", "Toy Story", "1995", ("Comedy",))
    liked = [data.Item("2", "Heat", "1995", ("Crime",)), data.Item("3", "Fargo", "1996", ("Crime",))]
    assert copy_corpus.lexicalize(template, item, liked) == "Toy Story is for fans of Fargo."


def test_training_lowers_the_loss_and_writes_the_run(tiny_copy_run):
    run, result = tiny_copy_run
    assert result["loss"][-1] < result["loss"][0] - 0.5
    assert result["heldout_perplexity"] > 1 and result["parameters"] > 0
    folder = run / copywriter.SUBDIR
    assert (folder / "model" / "config.json").is_file() and (folder / "model" / "tokenizer.json").is_file()
    assert json.loads((folder / "config.json").read_text())["n_embd"] == TINY.n_embd
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["copywriter"]["training"]["loss"] == result["loss"]


def test_decoder_matches_transformers_greedy():
    config = copywriter.CopywriterConfig(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                         top_k=1, repetition_penalty=1.0, max_new_tokens=6)
    tf.keras.utils.set_random_seed(0)
    model = copywriter.build_model(config, vocab_size=50, eos_id=0)
    decoder = copywriter.Decoder(model, config, eos_id=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids = tf.constant([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = tf.constant([[1, 1, 1, 1], [0, 0, 1, 1]])
    tokens, _ = tf.function(decoder.generate)(ids, mask, tf.constant(1, tf.int64))
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
    movielens, split = tiny_split
    module = copywriter_export.CopywriterModule.from_run(run)
    matcher = copy_corpus.TitleMatcher(movielens.items)
    fear, fargo = _item(movielens, "Fear"), _item(movielens, "Fargo")
    rows = tf.constant([module.item_rows.lookup(tf.constant(fear)).numpy()] * 4)
    liked = tf.ragged.constant([[module.item_rows.lookup(tf.constant(fargo)).numpy()], [], [], []])
    texts = tf.constant(["Fans of Fargo: Fear.", "Fear and Fargo.", "Primal Fear!", "no fear"])
    present, foreign = module._grounding(texts, rows, liked)
    assert present.numpy().tolist() == [True, True, False, False]
    assert foreign.numpy().tolist() == [False, True, True, False]
    # Served copy: generated when it passes, else the fallback; every line grounded.
    users = list(copy_corpus.top_items(split.train))[:3]
    items = [list(split.test.item_id[:4])] * 3
    out = module.details(tf.constant(users), tf.constant(items))
    best = copy_corpus.top_items(split.train, copy_corpus.MAX_LIKED + 1)
    for b, user in enumerate(users):
        for n, item in enumerate(items[b]):
            served = out["copy"][b, n].numpy().decode()
            liked_ids = tuple(i for i in best[user] if i != item)[:copy_corpus.MAX_LIKED]
            ok = bool(out["title_present"][b, n] and not out["other_title"][b, n]
                      and out["finished"][b, n] and out["slots_ok"][b, n])
            expected = out["generated"][b, n].numpy().decode() if ok else copy_corpus.fallback_line(
                movielens.items[item], [movielens.items[liked_ids[0]]] if liked_ids else [])
            assert served == expected
            assert matcher.check(served, item, liked_ids) == (True, [])


def test_export_round_trip_in_a_fresh_process(tiny_copy_run, tiny_split, tmp_path):
    run, _ = tiny_copy_run
    movielens, split = tiny_split
    path = copywriter_export.export_copywriter(run, tmp_path / "models")
    assert path == tmp_path / "models" / "copywriter" / "1"
    assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert "copywriter" in (tmp_path / "models" / "models.config").read_text()
    users = [split.train.user_id[0], "not-a-user"]
    items = [[split.test.item_id[0], split.test.item_id[1], "no-such-item"],
             [split.test.item_id[2], "", split.test.item_id[3]]]
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(users),
                             json.dumps(items)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert out["inputs"] == {"user_id": ["string", [None]], "item_ids": ["string", [None, None]]}
    assert out["outputs"] == {"copy": ["string", [None, None]]}
    assert out["copy"][0][2] == "" and out["copy"][1][1] == ""
    matcher = copy_corpus.TitleMatcher(movielens.items)
    best = copy_corpus.top_items(split.train, copy_corpus.MAX_LIKED + 1)
    for b, user in enumerate(users):
        for n, item in enumerate(items[b]):
            if item in movielens.items:
                liked = tuple(i for i in best.get(user, ()) if i != item)[:copy_corpus.MAX_LIKED]
                assert matcher.check(out["copy"][b][n], item, liked) == (True, [])


def test_local_gpt2_directory_loads_and_fine_tunes(tiny_data_dir, tmp_path):
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
    result = copywriter.train_copywriter(tmp_path / "run", tiny_data_dir, config, checkpoint=keras_dir,
                                         train_size=TINY_TRAIN, verbose=0)
    # Fine-tuned with the four slot tokens added to its vocabulary.
    assert result["parameters"] == model.count_params() + 4 * 32
    assert result["checkpoint"] == str(keras_dir)
