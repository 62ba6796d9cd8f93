"""The decoder's shared-prefix cache and batching: the same tokens as without them, and as
recomputing the whole sequence every step."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import decoder, kvcache
from jaxft.generate import MIN_PREFIX, generate, generate_no_cache, generate_text, shared_prefix
from jaxft.kvcache import prefill_prefix
from jaxft.model import Llama
from jaxft.templates import get_template

NEW = 8
rng = np.random.default_rng(3)
HEAD = [1] + rng.integers(3, 500, 44).tolist()  # a 45-token start, like few-shot examples
PROMPTS = [HEAD + rng.integers(3, 500, n).tolist() for n in (3, 11, 1, 7)]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return Llama(tiny_cfg, nnx.Rngs(0))


@pytest.fixture(scope="module")
def plain(model):
    return generate(model, PROMPTS, NEW)


def test_prefix_cache_equals_no_prefix_and_recompute(model, plain):
    prefix = prefill_prefix(model, shared_prefix(PROMPTS))
    assert len(prefix.ids) == len(HEAD) and prefix.k_NxKxPxE.shape[2] == len(HEAD)
    assert [len(x) for x in plain] == [NEW] * len(PROMPTS)
    assert generate(model, PROMPTS, NEW, prefix=prefix) == plain
    assert generate_no_cache(model, PROMPTS, NEW) == plain


def test_padded_rows_and_prompt_length_change_nothing(model, plain):
    prefix = prefill_prefix(model, HEAD[:40])  # a shorter prefix than the common start
    got = generate(model, PROMPTS[:3], NEW, prefix=prefix, rows=6, prompt_len=40)
    assert got == plain[:3]


def test_layer_views_share_the_weights_and_decode_the_same(model, plain, monkeypatch):
    views = kvcache.layer_views(model)
    stacked = model.blocks.mlp.w_up_DxF[...]
    step = stacked[0].nbytes
    assert len(views) == model.cfg.n_layers
    assert [v.mlp.w_up_DxF[...].unsafe_buffer_pointer() - stacked.unsafe_buffer_pointer()
            for v in views] == [i * step for i in range(len(views))]  # no copies
    np.testing.assert_array_equal(np.asarray(views[1].mlp.w_up_DxF[...]), np.asarray(stacked[1]))
    monkeypatch.setattr(kvcache, "layer_views", lambda m: None)  # slices of the stacked weights
    assert generate(model, PROMPTS, NEW) == plain


@pytest.mark.parametrize("draft", [0, 4])
def test_decode_step_writes_the_cache_in_place(model, draft):
    """The compiled decode loop holds no copy of any layer's cache: the slot writes are in
    place (a copy per step would move the whole cache twice, every token), with or without
    drafts (whose pass runs under a cond that must only read the cache)."""
    cfg, b, s = model.cfg, 3, 48
    rows = decoder.empty_rows(model, b, s, 16, None)
    graphdef, state = nnx.split(model)
    prefix = prefill_prefix(model, [])
    hlo = decoder._decode.lower(
        kvcache.Static(graphdef), state, prefix.k_NxKxPxE, prefix.v_NxKxPxE, rows,
        jnp.zeros(8, jnp.int32), jax.random.key(0), jnp.int32(16), jnp.int32(b),
        kvcache.layer_views(model), p=32, sampling=(0.0, 0, 1.0), draft=draft).compile().as_text()
    layer_cache = rf"f32\[{b},{cfg.n_kv_heads},{s},{cfg.head_size}\]"
    assert re.findall(rf"= {layer_cache}\S* (?:dynamic-update-slice|fusion)\(", hlo)  # the writes
    assert not re.findall(rf"= {layer_cache}\S* copy\(", hlo)


def test_prompt_without_the_prefix_is_refused(model):
    prefix = prefill_prefix(model, HEAD)
    with pytest.raises(ValueError, match="start with the cached prefix"):
        generate(model, [HEAD + [5], [1, 2, 3]], NEW, prefix=prefix)
    with pytest.raises(ValueError, match="at least one token after it"):
        generate(model, [HEAD], NEW, prefix=prefix)


def test_shared_prefix_keeps_a_token_of_each_prompt():
    assert shared_prefix(PROMPTS) == HEAD
    same = [HEAD + [7], HEAD + [7]]
    assert shared_prefix(same) == HEAD  # identical prompts: the last token stays their own
    assert shared_prefix([HEAD[:MIN_PREFIX - 1] + [5], HEAD[:MIN_PREFIX - 1] + [6]]) == []
    assert shared_prefix([HEAD + [5]]) == []


def test_generate_text_keeps_record_order_across_sorted_batches(tiny_cfg, sp_tokenizer):
    tok = sp_tokenizer
    model = Llama(dataclasses.replace(tiny_cfg, vocab_size=len(tok)), nnx.Rngs(1))
    prompts = [[tok.bos_id] + tok.encode(t) for t in
               ("a short one", "a much longer request about the game that came out", "mid size text")]
    texts = generate_text(model, tok, get_template("special-tokens"), [{}] * 3, NEW,
                          batch_size=2, prompts=prompts)
    alone = [tok.decode(generate(model, [p], NEW, eos_ids=(tok.eos_id,))[0]) for p in prompts]
    assert texts == alone
