"""KV-cache decoding against full recomputation, batching, sharding, stopping and sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import decoder
from jaxft.config import MeshConfig
from jaxft.decoder import group_size, lookup
from jaxft.generate import bucket, cut_at_stop, generate, generate_no_cache, left_pad, sample_logits
from jaxft.model import Llama
from jaxft.sharding import make_mesh
from jaxft.state import init_model

PROMPTS = [[1, 5, 9, 33, 2], [1, 7], [1, 100, 200, 300, 400, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
NEW = 10


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return Llama(tiny_cfg, nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens by recomputing the whole sequence every step."""
    return generate_no_cache(model, PROMPTS, NEW)


def sharded_copy(model, cfg, mesh_cfg):
    sharded = init_model(cfg, make_mesh(mesh_cfg), seed=1)
    target = jax.tree.map(lambda x: x.sharding, nnx.state(sharded, nnx.Param))
    nnx.update(sharded, jax.device_put(nnx.state(model, nnx.Param), target))
    return sharded


def test_cache_matches_full_recompute(model, reference):
    assert [len(r) for r in reference] == [NEW] * len(PROMPTS)
    assert generate(model, PROMPTS, NEW) == reference


def test_batched_equals_one_at_a_time(model, reference):
    # Alone, a prompt has no padding: equal results mean padding is invisible to real tokens.
    assert [generate(model, [p], NEW)[0] for p in PROMPTS] == reference


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=4), MeshConfig(fsdp=4, tensor=2)],
                         ids=["data2-fsdp4", "fsdp4-tensor2"])
def test_sharded_matches_single_device(model, tiny_cfg, reference, mesh_cfg):
    sharded = sharded_copy(model, tiny_cfg, mesh_cfg)
    assert len(sharded.embed_VxD[...].sharding.device_set) == 8
    assert generate(sharded, PROMPTS, NEW) == reference


def test_rows_refill_as_answers_end(model):
    # Seven prompts through two rows: a row whose answer ends takes the next prompt, over
    # cache slots the last one wrote (they must stay invisible), and stopped rows stop early.
    rng = np.random.default_rng(5)
    prompts = [[1] + rng.integers(3, 200, n).tolist() for n in (4, 9, 1, 12, 6, 3, 14)]
    free = [generate(model, [p], NEW)[0] for p in prompts]
    stop = max(set(free[0]), key=lambda t: sum(t in f for f in free) < len(free))
    alone = [generate(model, [p], NEW, eos_ids=(stop,))[0] for p in prompts]
    assert 0 < min(map(len, alone)) and len(set(map(len, alone))) > 1
    assert generate(model, prompts, NEW, eos_ids=(stop,), rows=2) == alone
    assert generate(model, prompts, NEW, eos_ids=(stop,), rows=4) == alone
    assert group_size(4, 7) == 1 and group_size(25, 100) == 5 and group_size(8, 3) == 8


def test_left_pad_positions_start_at_each_prompt():
    ids, pos, seg = left_pad([[4, 5, 6], [7]], rows=3, length=4)
    assert ids.tolist() == [[0, 4, 5, 6], [0, 0, 0, 7], [0, 0, 0, 4]]
    assert pos.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert seg.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


# ---------------------------------------------------------------- a model whose output is known

def chain_model(cfg, n_used: int | None = None, seed: int = 0):
    """A model that maps the last token t to succ[t] whatever came before: blocks are zero (the
    residual passes the embedding through), embeddings are unit-scaled random directions and
    the head row of succ[t] is t's embedding. succ permutes the first n_used ids."""
    m = Llama(cfg, nnx.Rngs(0))
    v, d = cfg.vocab_size, cfg.dim
    n_used = n_used or v
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(m.embed_VxD[...].shape[0], d)).astype(np.float32)
    e *= np.sqrt(d) / np.linalg.norm(e, axis=1, keepdims=True)
    succ = np.concatenate([rng.permutation(n_used), np.arange(n_used, v)])
    head = np.zeros_like(e)
    head[succ] = e[:v]
    m.embed_VxD[...] = jnp.asarray(e)
    m.lm_head_VxD[...] = jnp.asarray(head)
    blocks = nnx.state(m.blocks, nnx.Param)
    nnx.update(m.blocks, jax.tree.map(jnp.zeros_like, blocks))
    # The construction itself: every token's next-token argmax is its successor.
    ids = jnp.arange(v)[:, None]
    assert (np.asarray(m(ids)[:, 0].argmax(-1)) == succ).all()
    return m, succ


@pytest.fixture(scope="module")
def chain(tiny_cfg):
    return chain_model(tiny_cfg)


def walk(succ, t, n):
    out = []
    for _ in range(n):
        t = int(succ[t])
        out.append(t)
    return out


def test_stops_at_eos_and_max_tokens(chain):
    m, succ = chain
    a, b = [1, 2, 3], [4, 5]
    path_a, path_b = walk(succ, 3, 12), walk(succ, 5, 12)
    eos = path_a[4]
    assert eos not in path_b
    out = generate(m, [a, b], 12, eos_ids=(eos,))
    # Row a stops before its EOS; row b runs to the budget while a is finished.
    assert out == [path_a[:4], path_b]
    assert generate(m, [a], 3) == [path_a[:3]]
    assert generate(m, [b], 12, eos_ids=(eos,), stop_ids=[path_b[1]]) == [path_b[:1]]
    assert generate_no_cache(m, [a, b], 12, eos_ids=(eos,)) == out


def test_lookup_drafts_what_followed_the_last_tokens():
    ids = jnp.asarray([[-1, 5, 7, 8, 9, 3, 7, -1, -1]])  # slots 0..6 written, next is slot 7
    draft = lambda tok: np.asarray(lookup(ids, jnp.asarray([7]), jnp.asarray([tok]), 4)).tolist()
    assert draft(8) == [[9, 3, 7, 8]]  # "7 8" seen at slots 2-3; the copy ends at 8 itself
    assert draft(9) == [[3, 7, 9, -1]]  # no "7 9": the last "9" alone, copied up to slot 7
    assert draft(5) == [[7, 8, 9, 3]]
    assert draft(7) == [[8, 9, 3, 7]]  # "7" at slots 2 and 6: only slot 2 has 4 tokens after it
    assert draft(11) == [[-1] * 4]  # never seen
    assert draft(-1) == [[-1] * 4]  # a finished row


def test_lookup_prefers_the_latest_full_copy_and_fills_runs():
    ids = jnp.asarray([[-1, 7, 1, 2, 3, 7, 4, 5, 6, 0, -1, -1]])
    got = lookup(ids, jnp.asarray([10]), jnp.asarray([7]), 4)
    assert np.asarray(got).tolist() == [[4, 5, 6, 0]]  # slot 5, not slot 1
    run = jnp.asarray([[5, 4, 4, 4, 4, 4, 4, -1, -1, -1]])  # a run: the next token is 4 again
    got = lookup(run, jnp.asarray([7]), jnp.asarray([4]), 4)
    assert np.asarray(got).tolist() == [[4, 4, 4, 4]]


def passes_of(monkeypatch):
    """Decode passes per `generate` call (the loop's step count when it returns)."""
    passes, real = [], decoder._decode

    def counted(*a, **kw):
        out = real(*a, **kw)
        passes.append(int(out.step))
        return out

    monkeypatch.setattr(decoder, "_decode", counted)
    return passes


def test_drafts_keep_the_tokens_in_fewer_passes(tiny_cfg, monkeypatch):
    """Successor cycles among 12 ids, and prompts that already walk 12 steps of them: every
    draft is right from the first pass. A stop token and the budget fall inside a pass's
    drafts; the tokens are those of one token a pass."""
    m, succ = chain_model(tiny_cfg, n_used=12)
    prompts = [[t] + walk(succ, t, 12) for t in (3, 5)]
    n = 43
    want = [walk(succ, p[-1], n) for p in prompts]
    passes = passes_of(monkeypatch)
    assert generate(m, prompts, n) == want
    assert generate(m, prompts, n, draft=4) == want
    assert passes == [n, -(-n // 5)]
    eos = want[0][7]  # the second pass's third token
    cut = [w[:w.index(eos)] if eos in w else w for w in want]
    assert generate(m, prompts, n, eos_ids=(eos,), draft=4) == cut
    assert generate(m, prompts, n, eos_ids=(eos,)) == cut
    sampled = generate(m, prompts, n, temperature=1.0)  # drafts are for greedy only
    assert generate(m, prompts, n, draft=4, temperature=1.0) == sampled


def test_drafts_rejected_change_nothing(model, reference, monkeypatch):
    passes = passes_of(monkeypatch)
    assert generate(model, PROMPTS, NEW, draft=3) == reference
    assert passes[0] <= NEW


def test_stop_at_first_token_gives_empty(chain):
    m, succ = chain
    assert generate(m, [[1, 7]], 5, eos_ids=(int(succ[7]),)) == [[]]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="cache_len=16"):
        generate(model, [[1, 2]], 4, cache_len=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 100000]], 4)


def test_cut_at_stop():
    assert cut_at_stop("abc<END_A>def\n\n### x", ["\n\n### ", "<END_A>"]) == "abc"
    assert cut_at_stop("abc", ["zz"]) == "abc"


# ---------------------------------------------------------------- sampling

def test_sampling_deterministic_per_seed(model):
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, PROMPTS, NEW, seed=1, **kw)
    assert generate(model, PROMPTS, NEW, seed=1, **kw) == a
    assert generate(model, PROMPTS, NEW, seed=2, **kw) != a
    assert generate_no_cache(model, PROMPTS, NEW, seed=1, **kw) == a


# Seven tokens in scrambled order; the last two are almost never drawn even untruncated.
PROBS = {3: 0.40, 0: 0.25, 6: 0.15, 1: 0.10, 5: 0.06, 2: 0.04, 4: 0.0}
N_DRAWS = 20000


def draw(temperature=1.0, top_k=0, top_p=1.0, seed=0):
    p = np.array([PROBS[i] for i in range(7)]) + 1e-12
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (N_DRAWS, 7))
    tok = np.asarray(sample_logits(jax.random.key(seed), logits, temperature, top_k, top_p))
    return np.bincount(tok, minlength=7) / N_DRAWS


def expected(allowed, temperature=1.0):
    w = {t: PROBS[t] ** (1 / temperature) for t in allowed}
    z = sum(w.values())
    return np.array([w.get(i, 0.0) / z for i in range(7)])


@pytest.mark.parametrize("kw,allowed", [
    (dict(top_k=3), {3, 0, 6}),
    (dict(top_p=0.6), {3, 0}),  # 0.40 < 0.6, then 0.65 crosses: the crossing token stays
    (dict(top_p=0.7), {3, 0, 6}),
    (dict(top_k=2, top_p=0.99), {3, 0}),
    (dict(top_k=1), {3}),
    (dict(), set(PROBS)),
    (dict(temperature=0.5, top_k=4), {3, 0, 6, 1}),
])
def test_top_k_top_p_respected(kw, allowed):
    kw = {"temperature": 1.0, **kw}
    freq = draw(**kw)
    outside = [i for i in range(7) if i not in allowed]
    assert freq[outside].sum() == 0.0
    np.testing.assert_allclose(freq, expected(allowed, kw["temperature"]), atol=0.015)


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    assert sample_logits(jax.random.key(0), logits).tolist() == [1, 0]
    # Ties go to the first maximum and a NaN wins, as with jnp.argmax, at a real vocab size.
    big = jax.random.normal(jax.random.key(1), (4, 49152))
    big = big.at[:, 9].set(big.max()).at[:, 40000].set(big.max()).at[2, 30000].set(jnp.nan)
    got = sample_logits(jax.random.key(0), big)
    assert got.tolist() == np.asarray(jnp.argmax(big, axis=-1)).tolist() == [9, 9, 30000, 9]
