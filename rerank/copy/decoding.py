"""The copywriter's decoder: KV-cached sampling from GPT-2 weights in plain TF ops.

`Decoder` runs inside the exported copywriter (`rerank.copy.graph`) and in evaluation; it reads
the weights of a trained `TFGPT2LMHeadModel` (`rerank.copy.copywriter`) once, so the SavedModel
holds neither Keras nor transformers.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf

from rerank.config import CopywriterConfig
from rerank.copy.copywriter import CopywriterError


UNIFORM_BUCKETS = 2**24  # every multiple of 2^-24 in [0, 1) is exact in float32


def uniforms(keys: tf.Tensor, steps: int) -> tf.Tensor:
    """keys string [R] -> float32 [R, steps] in [0, 1): a fingerprint hash of (key, step), one
    draw per row and step that depends on nothing but the key (stateless random ops take one
    seed for the whole batch, so a row's draw would depend on the rows beside it)."""
    suffixes = "\x1f" + tf.strings.as_string(tf.range(steps))  # [steps]
    hashed = tf.strings.to_hash_bucket_fast(keys[:, None] + suffixes[None], UNIFORM_BUCKETS)
    return tf.cast(hashed, tf.float32) * (1.0 / UNIFORM_BUCKETS)


class Decoder(tf.Module):
    """Sampling from GPT-2 weights in plain TF ops: one forward pass over the left-padded prompts
    fills a key/value cache, then a `tf.while_loop` feeds one token per step, attending to the
    cache, until every row has written EOS or `max_new_tokens` is reached.

    Why not `TFGPT2LMHeadModel.generate` or the model's own call with `past_key_values`: without
    XLA (stock TF Serving) their per-step graphs cost 3-4 ms for 2 layers x 128 on 2 cores; this
    one, with far fewer ops, about 1 ms, which is what fits 10 lines in 150 ms. The weights are
    copied into plain variables, so the SavedModel needs neither Keras nor transformers.
    Sampling: repetition penalty on the tokens generated so far (never on the prompt, whose
    titles the copy must repeat), temperature, top-k, then top-p within the top k; the draw is
    an inverse CDF of a uniform hashed from the row's key and the step (`uniforms`), so a row
    writes the same tokens alone or in any batch.
    """

    def __init__(self, model, config: CopywriterConfig, eos_id: int):
        super().__init__()
        gpt2 = model.config
        if gpt2.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise CopywriterError(f"activation {gpt2.activation_function!r} is not supported")
        if gpt2.scale_attn_by_inverse_layer_idx or not gpt2.scale_attn_weights:
            raise CopywriterError("only GPT-2's default attention scaling is supported")
        self.heads, self.epsilon, self.eos_id = gpt2.n_head, gpt2.layer_norm_epsilon, eos_id
        self.exact_gelu = gpt2.activation_function == "gelu"
        self.max_positions = gpt2.n_positions
        self.config = config
        transformer = model.transformer

        def copy(weight):
            return tf.Variable(weight.numpy(), trainable=False)
        self.wte, self.wpe = copy(transformer.wte.embeddings), copy(transformer.wpe.embeddings)
        self.blocks = [{name: copy(weight) for name, weight in {
            "ln_1_g": block.ln_1.gamma, "ln_1_b": block.ln_1.beta,
            "attn_w": block.attn.c_attn.weight, "attn_b": block.attn.c_attn.bias,
            "proj_w": block.attn.c_proj.weight, "proj_b": block.attn.c_proj.bias,
            "ln_2_g": block.ln_2.gamma, "ln_2_b": block.ln_2.beta,
            "fc_w": block.mlp.c_fc.weight, "fc_b": block.mlp.c_fc.bias,
            "mlp_w": block.mlp.c_proj.weight, "mlp_b": block.mlp.c_proj.bias}.items()}
            for block in transformer.h]
        self.ln_f = (copy(transformer.ln_f.gamma), copy(transformer.ln_f.beta))

    def _norm(self, x, gamma, beta):
        mean, variance = tf.nn.moments(x, [-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * gamma + beta

    def _gelu(self, x):
        if self.exact_gelu:
            return tf.nn.gelu(x, approximate=False)
        return 0.5 * x * (1.0 + tf.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    def _forward(self, x, caches, bias):
        """x [R, T, D]; caches [(k, v) [R, H, S, D/H]] per layer; bias [R, 1, T, S+T] (0 or
        -1e9) -> last hidden state [R, T, D] after ln_f, and the caches extended by T."""
        rows, length, width = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
        size = width // self.heads
        extended = []
        for block, (past_k, past_v) in zip(self.blocks, caches):
            h = self._norm(x, block["ln_1_g"], block["ln_1_b"])
            qkv = tf.matmul(h, block["attn_w"]) + block["attn_b"]  # [R, T, 3D]
            qkv = tf.transpose(tf.reshape(qkv, [rows, length, 3, self.heads, size]), [2, 0, 3, 1, 4])
            k = tf.concat([past_k, qkv[1]], axis=2)  # [R, H, S+T, D/H]
            v = tf.concat([past_v, qkv[2]], axis=2)
            extended.append((k, v))
            scores = tf.matmul(qkv[0], k, transpose_b=True) * (1.0 / math.sqrt(size)) + bias
            y = tf.matmul(tf.nn.softmax(scores), v)  # [R, H, T, D/H]
            y = tf.reshape(tf.transpose(y, [0, 2, 1, 3]), [rows, length, width])
            x = x + tf.matmul(y, block["proj_w"]) + block["proj_b"]
            h = self._norm(x, block["ln_2_g"], block["ln_2_b"])
            h = self._gelu(tf.matmul(h, block["fc_w"]) + block["fc_b"])
            x = x + tf.matmul(h, block["mlp_w"]) + block["mlp_b"]
        return self._norm(x, *self.ln_f), extended

    def prompt_logits(self, ids, mask):
        """Next-token logits [R, V] after left-padded prompts ids/mask [R, P], and the caches."""
        rows, length = tf.shape(ids)[0], tf.shape(ids)[1]
        positions = tf.maximum(tf.cumsum(mask, axis=1) - 1, 0)  # left padding: first token at 0
        x = tf.gather(self.wte, ids) + tf.gather(self.wpe, positions)
        causal = tf.linalg.band_part(tf.ones([length, length]), -1, 0)
        allowed = causal[None, None] * tf.cast(mask, tf.float32)[:, None, None, :]
        size = self.wte.shape[-1] // self.heads
        empty = tf.zeros([rows, self.heads, 0, size])
        x, caches = self._forward(x, [(empty, empty)] * len(self.blocks), (1.0 - allowed) * -1e9)
        return tf.matmul(x[:, -1], self.wte, transpose_b=True), caches, positions[:, -1]

    def sample(self, logits, generated, uniform):
        """One token per row [R] from logits [R, V] by inverse CDF: the filtered distribution's
        tokens are laid out in token-id order on [0, 1) and `uniform` [R] picks one, so a row's
        draw depends on its own logits and uniform alone; `generated` [R, V] marks tokens
        written. Id order, not probability order: two nearly tied tokens whose order flips with
        a last-bit difference of the logits (a row alone or beside longer prompts) keep their
        places, and the draw moves only if the uniform lies within that difference of a boundary."""
        config = self.config
        penalized = tf.where(logits > 0, logits / config.repetition_penalty,
                             logits * config.repetition_penalty)
        logits = tf.where(generated > 0, penalized, logits) / config.temperature
        top, indices = tf.math.top_k(logits, k=min(config.top_k, int(self.wte.shape[0])))
        probabilities = tf.nn.softmax(top)  # [R, k], most likely first
        kept = tf.cumsum(probabilities, axis=-1, exclusive=True) < config.top_p  # >= 1 token
        order = tf.argsort(indices, axis=-1)  # [R, k], token-id order
        tokens = tf.gather(indices, order, batch_dims=1)
        cumulative = tf.cumsum(tf.gather(tf.where(kept, probabilities, 0.0), order, batch_dims=1),
                               axis=-1)
        total = cumulative[:, -1:]
        # Below the total, so the draw lands on a token of positive probability.
        target = tf.minimum(uniform[:, None] * total, tf.math.nextafter(total, 0.0))
        choice = tf.reduce_sum(tf.cast(cumulative <= target, tf.int32), axis=1)
        return tf.gather(tokens, choice, batch_dims=1)

    def generate(self, ids, mask, keys):
        """ids, mask int32 [R, P] (prompts padded on the left), keys string [R] (each row's
        randomness, see `uniforms`) -> (tokens int32 [R, T<=max_new_tokens], EOS after the end;
        finished bool [R])."""
        config, eos = self.config, self.eos_id
        rows, prompt_length = tf.shape(ids)[0], tf.shape(ids)[1]
        tf.debugging.assert_less_equal(
            prompt_length + config.max_new_tokens, self.max_positions,
            message="prompt plus max_new_tokens exceeds the model's n_positions")
        logits, caches, position = self.prompt_logits(ids, mask)
        draws = uniforms(keys, config.max_new_tokens)  # [R, max_new_tokens]
        key_bias = (1.0 - tf.cast(mask, tf.float32)) * -1e9  # [R, S]
        vocab = tf.shape(self.wte)[0]
        generated = tf.zeros([rows, vocab])
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        finished = tf.zeros([rows], tf.bool)
        flat = [tensor for pair in caches for tensor in pair]

        def step(i, logits, generated, finished, position, key_bias, tokens, *flat):
            token = self.sample(logits, generated, draws[:, i])
            token = tf.where(finished, eos, token)
            tokens = tokens.write(i, token)
            finished = finished | (token == eos)
            generated = tf.maximum(generated, tf.one_hot(token, vocab))
            position = position + 1
            key_bias = tf.concat([key_bias, tf.zeros([rows, 1])], axis=1)
            x = (tf.gather(self.wte, token) + tf.gather(self.wpe, position))[:, None]
            pairs = list(zip(flat[0::2], flat[1::2]))
            x, pairs = self._forward(x, pairs, key_bias[:, None, None, :])
            logits = tf.matmul(x[:, -1], self.wte, transpose_b=True)
            return (i + 1, logits, generated, finished, position, key_bias, tokens,
                    *[tensor for pair in pairs for tensor in pair])

        cache_shape = tf.TensorShape([None, self.heads, None, self.wte.shape[-1] // self.heads])
        out = tf.while_loop(
            lambda i, logits, generated, finished, *_: (
                (i < config.max_new_tokens) & ~tf.reduce_all(finished)),
            step, (0, logits, generated, finished, position, key_bias, tokens, *flat),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]),
                              tf.TensorShape([None, None]), tf.TensorShape([None]),
                              tf.TensorShape([None]), tf.TensorShape([None, None]), None,
                              *[cache_shape] * len(flat)))
        count, finished, tokens = out[0], out[3], out[6]
        tokens = tf.reshape(tf.transpose(tokens.stack()), [rows, count])  # [R, T]
        return tokens, finished
