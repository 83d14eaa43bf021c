"""Batched generation with a preallocated KV cache: prefill once, then one token per step.

Prompts are left-padded to a shared length bucket so every row writes the cache at the same
index; padding has segment id 0 (never attended) and positions count real tokens only
(cumsum(mask) - 1), so each row computes what it would alone (except that scaled RoPE variants
key on the batch's longest row, as transformers does for a padded batch). Tile buffers are padded
to a power of two with flag-0 tiles. Shapes therefore depend only on (batch, length bucket, tile
bucket, max_new_tokens), and each combination compiles once.

Two drivers share the same jitted prefill and step functions:
  * `Generator.generate`: prefill + `lax.while_loop` on device, stopping early when every row
    has produced a stop token (batch evaluation, benchmarks);
  * `Generator.start` / `Generator.step` / `Generator.stream`: a host loop with one dispatch per
    token, for streaming to a terminal.
For one seed both give the same tokens: step i samples with `fold_in(key, i)` in either driver.

Decode steps embed the sampled ids with the plain token table (no image splice): generated ids
are never image placeholders, even if a random model emits the `<IMG_CONTEXT>` id.

Checkpoints often pad the embedding table beyond the tokenizer (to a multiple of 64 or 128);
logits at ids >= `GenerationConfig.vocab_size` (the tokenizer's) are set to -inf before greedy
or sampled choice, so an id the tokenizer cannot decode is never produced.

Phi-3 LongRoPE picks its factor list from max(position)+1 at every step, like transformers'
InternVLForConditionalGeneration; cached keys keep the rotation they were written with.
(`Phi3ForCausalLM.generate` instead recomputes the whole cache once when the sequence crosses
`original_max_position_embeddings`.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_internvl_jax.batch import BATCH_DTYPES
from mini_internvl_jax.infer.sampling import SamplingConfig, sample_logits
from mini_internvl_jax.models.internvl import ImageTokenMismatchError
from mini_internvl_jax.models.llm import KVCache
from mini_internvl_jax.sharding import shard_activation

CACHE_NAMES = (None, "batch", None, "act_kv_heads", None)  # [L, B, T, KV, hd]
MAX_STOP_IDS = 8


@dataclass(frozen=True)
class Prompt:
    """One prompt: token ids [S] and the tiles of its images [T, 3, H, W] (None: text only)."""

    input_ids: Sequence[int] | np.ndarray
    pixel_values: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Generation of a row ends after it emits one of these (template end token, EOS).
    stop_token_ids: tuple[int, ...] = ()
    # Fills the prompt's left padding and the output of rows that already stopped.
    pad_token_id: int = 0
    min_length_bucket: int = 64
    # Ids the tokenizer knows (its vocab_size); larger ids (padded embeddings) are never chosen.
    # None: every row of the model's output layer may be chosen.
    vocab_size: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {self.stop_token_ids}")
        if self.min_length_bucket < 1:
            raise ValueError(f"min_length_bucket must be >= 1, got {self.min_length_bucket}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")


@dataclass
class DecodeState:
    """Host handle on a running batch (device arrays; `tokens` are the latest ids [B])."""

    tokens: jax.Array
    logits: jax.Array  # float32 [B, V] the latest tokens were chosen from
    done: jax.Array
    cache: KVCache
    positions: jax.Array
    key: jax.Array
    step: int
    num_rows: int  # rows that belong to the caller (the rest pad the batch)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def length_bucket(n: int, minimum: int = 64) -> int:
    return max(minimum, _next_pow2(n))


def cache_length(bucket: int, max_new_tokens: int) -> int:
    return _round_up(bucket + max_new_tokens, 64)


class Generator:
    """Generation for an `InternVLModel` (on one device, or with parameters on `mesh`).

    Holds the parameter arrays the model has when the Generator is made; build a new one after
    changing the model's weights.
    """

    def __init__(self, model, *, mesh=None):
        self.cfg = model.cfg
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        self._leaves, treedef = jax.tree.flatten(state)
        # Static jit arguments: equal models share compiled code across Generator instances.
        self._model_def = (graphdef, treedef)

    # ---------------------------------------------------------------- batch preparation

    def prepare(self, prompts: Sequence[Prompt], gen: GenerationConfig,
                batch_size: int | None = None) -> dict:
        """Left-padded numpy batch: input_ids, positions, segment_ids, pixel_values, flags
        (the training-batch fields a forward pass reads, with their dtypes), plus controls."""
        if not prompts:
            raise ValueError("generate: no prompts given")
        rows = len(prompts)
        b = rows if batch_size is None else batch_size
        if b < rows:
            raise ValueError(f"generate: {rows} prompts do not fit batch_size {b}")
        img_id, per_tile = self.cfg.image_token_id, self.cfg.num_image_tokens
        if gen.pad_token_id == img_id:
            raise ValueError(f"pad_token_id {gen.pad_token_id} is the image placeholder id")
        ids_list, tiles = [], []
        for i, p in enumerate(prompts):
            ids = np.asarray(p.input_ids, np.int64).reshape(-1)
            if ids.size == 0:
                raise ValueError(f"prompt {i} is empty")
            if ids.min() < 0 or ids.max() >= self.cfg.llm.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, "
                                 f"{self.cfg.llm.vocab_size})")
            n_tiles = 0 if p.pixel_values is None else len(p.pixel_values)
            n_img = int(np.sum(ids == img_id))
            if n_img != n_tiles * per_tile:
                raise ImageTokenMismatchError(
                    f"prompt {i} has {n_img} <IMG_CONTEXT> tokens (id {img_id}) but {n_tiles} "
                    f"tiles x {per_tile} = {n_tiles * per_tile} image tokens")
            if n_tiles:
                tiles.append(self._check_tiles(np.asarray(p.pixel_values, np.float32), i))
            ids_list.append(ids)
        s = length_bucket(max(len(x) for x in ids_list), gen.min_length_bucket)
        input_ids = np.full((b, s), gen.pad_token_id, BATCH_DTYPES["input_ids"])
        mask = np.zeros((b, s), BATCH_DTYPES["segment_ids"])
        for r, ids in enumerate(ids_list):
            input_ids[r, s - len(ids):] = ids
            mask[r, s - len(ids):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(BATCH_DTYPES["positions"])
        batch = {"input_ids": input_ids, "positions": positions, "segment_ids": mask,
                 "pixel_values": None, "image_flags": None, "active": np.arange(b) < rows,
                 "control": control_arrays(gen), "num_rows": rows}
        if tiles:
            real = np.concatenate(tiles)
            t = _next_pow2(len(real))
            px = np.zeros((t,) + real.shape[1:], BATCH_DTYPES["pixel_values"])
            px[:len(real)] = real
            flags = np.zeros((t,), BATCH_DTYPES["image_flags"])
            flags[:len(real)] = 1
            batch["pixel_values"], batch["image_flags"] = px, flags
        return batch

    def _check_tiles(self, px: np.ndarray, i: int) -> np.ndarray:
        v = self.cfg.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if px.ndim != 4 or px.shape[1:] != want:
            raise ValueError(f"prompt {i}: pixel_values must be [tiles, {want[0]}, {want[1]}, "
                             f"{want[2]}], got {px.shape}")
        return px

    def _run(self, fn, *args, **static):
        if self.mesh is None:
            return fn(*args, model_def=self._model_def, **static)
        with jax.set_mesh(self.mesh):
            return fn(*args, model_def=self._model_def, **static)

    # ---------------------------------------------------------------- public drivers

    def generate(self, prompts: Sequence[Prompt], gen: GenerationConfig, *, seed: int = 0,
                 batch_size: int | None = None) -> list[list[int]]:
        """New token ids per prompt, ending with the stop token when one was produced."""
        batch = self.prepare(prompts, gen, batch_size)
        rows = batch.pop("num_rows")
        cache_len = cache_length(batch["input_ids"].shape[1], gen.max_new_tokens)
        out = np.asarray(self._run(_generate_jit, self._leaves, batch, jax.random.key(seed),
                                   cache_len=cache_len, sampling=gen.sampling,
                                   max_new_tokens=gen.max_new_tokens))
        return [trim(row, gen.stop_token_ids) for row in out[:rows]]

    def start(self, prompts: Sequence[Prompt], gen: GenerationConfig, *, seed: int = 0,
              batch_size: int | None = None) -> DecodeState:
        """Prefill; the returned state holds the first new token of each row."""
        batch = self.prepare(prompts, gen, batch_size)
        rows = batch.pop("num_rows")
        cache_len = cache_length(batch["input_ids"].shape[1], gen.max_new_tokens)
        key = jax.random.key(seed)
        tokens, logits, done, cache, positions = self._run(
            _prefill_jit, self._leaves, batch, key, cache_len=cache_len, sampling=gen.sampling)
        return DecodeState(tokens, logits, done, cache, positions, key, 1, rows)

    def step(self, st: DecodeState, gen: GenerationConfig) -> DecodeState:
        """The next token of every row (the cache is updated in place)."""
        tokens, logits, done, cache, positions = self._run(
            _decode_jit, self._leaves, st.tokens, st.done, st.cache, st.positions, st.key,
            jnp.int32(st.step), control_arrays(gen), sampling=gen.sampling)
        return DecodeState(tokens, logits, done, cache, positions, st.key, st.step + 1,
                           st.num_rows)

    def stream(self, prompts: Sequence[Prompt], gen: GenerationConfig, *, seed: int = 0
               ) -> Iterator[np.ndarray]:
        """Yields the new token of every row [B] as soon as it exists; padding once stopped."""
        st = self.start(prompts, gen, seed=seed)
        while True:
            yield np.asarray(st.tokens)[:st.num_rows]
            if st.step >= gen.max_new_tokens or bool(np.all(np.asarray(st.done))):
                return
            st = self.step(st, gen)


# ------------------------------------------------------------------------ traced functions


def _merge(model_def, leaves):
    graphdef, treedef = model_def
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _prefill(leaves, batch, key, *, model_def, cache_len, sampling):
    """Prompt forward filling the cache; samples the first new token."""
    model = _merge(model_def, leaves)
    b = batch["input_ids"].shape[0]
    cache = model.llm.init_cache(b, cache_len)
    cache = cache.replace(k=shard_activation(cache.k, CACHE_NAMES),
                          v=shard_activation(cache.v, CACHE_NAMES))
    out = model.hidden_states(
        batch["input_ids"], batch["pixel_values"], batch["image_flags"],
        batch["positions"], batch["segment_ids"], cache=cache)
    cache = out.cache
    logits = mask_vocab(model.llm.logits(out.hidden[:, -1:])[:, 0],
                        batch["control"]["vocab_limit"])
    tokens = sample_logits(logits, jax.random.fold_in(key, 0), sampling)
    done = jnp.isin(tokens, batch["control"]["stop_ids"]) | ~batch["active"]
    positions = batch["positions"][:, -1] + 1
    return tokens, logits, done, cache, positions


def _decode(leaves, tokens, done, cache, positions, key, step, control, *, model_def,
            sampling):
    """One token per row from the previous one; rows already done emit padding."""
    model = _merge(model_def, leaves)
    x = model.llm.embed(tokens[:, None])
    seg = jnp.ones_like(tokens)[:, None]
    out = model.llm(x, positions[:, None], seg, cache=cache)
    cache = out.cache
    logits = mask_vocab(model.llm.logits(out.hidden)[:, 0], control["vocab_limit"])
    nxt = sample_logits(logits, jax.random.fold_in(key, step), sampling)
    nxt = jnp.where(done, control["pad_id"], nxt)
    done = done | jnp.isin(nxt, control["stop_ids"])
    return nxt, logits, done, cache, positions + 1


def _generate(leaves, batch, key, *, model_def, cache_len, sampling, max_new_tokens):
    tokens, _, done, cache, positions = _prefill(
        leaves, batch, key, model_def=model_def, cache_len=cache_len, sampling=sampling)
    b, n, control = tokens.shape[0], max_new_tokens, batch["control"]
    out = jnp.full((b, n), control["pad_id"], jnp.int32).at[:, 0].set(tokens)

    def cond(c):
        step, _, done, *_ = c
        return (step < n) & ~jnp.all(done)

    def body(c):
        step, tokens, done, cache, positions, out = c
        tokens, _, done, cache, positions = _decode(
            leaves, tokens, done, cache, positions, key, step, control, model_def=model_def,
            sampling=sampling)
        return step + 1, tokens, done, cache, positions, out.at[:, step].set(tokens)

    init = (jnp.int32(1), tokens, done, cache, positions, out)
    return jax.lax.while_loop(cond, body, init)[-1]


_prefill_jit = jax.jit(_prefill, static_argnames=("model_def", "cache_len", "sampling"))
_decode_jit = jax.jit(_decode, static_argnames=("model_def", "sampling"),
                      donate_argnames=("cache",))
_generate_jit = jax.jit(_generate, static_argnames=("model_def", "cache_len", "sampling",
                                                    "max_new_tokens"))


def mask_vocab(logits: jax.Array, vocab_limit: jax.Array) -> jax.Array:
    """logits [B, V] with the columns >= vocab_limit (padded embedding rows) at -inf."""
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < vocab_limit, logits, -jnp.inf)


def control_arrays(gen: GenerationConfig) -> dict:
    """Stop and pad ids and the vocabulary limit as arrays (not compile-time constants):
    changing them reuses compiles."""
    stop = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop[:len(gen.stop_token_ids)] = gen.stop_token_ids
    limit = np.iinfo(np.int32).max if gen.vocab_size is None else gen.vocab_size
    return {"stop_ids": stop, "pad_id": np.int32(gen.pad_token_id),
            "vocab_limit": np.int32(limit)}


def trim(tokens: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first stop token."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stop_token_ids:
            break
    return out
