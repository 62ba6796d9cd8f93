"""jaxft as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4.x), registered as "jaxft":

    jaxft lm-eval --model jaxft --model_args path=MODEL_DIR,batch_size=16 --tasks hellaswag

Importing this module registers the model (lm-eval 0.4 finds external models only through its
registry, not through package entry points); `jaxft lm-eval` imports it and hands the rest of
its command line to lm-eval's own CLI.

Requests are tokenised, prefixed, windowed and left-truncated the way lm-eval's `hf` backend
does it, so a jaxft model and its `jaxft convert --to-hf` export score the same. The work is
batched: loglikelihood rows are sorted longest first, a context shared by several
continuations (multiple choice) is prefilled once into a KV cache that each continuation then
reads, and shapes are bucketed (rows fixed, lengths to a few sizes) so compiles are reused from
batch to batch. Generation is `jaxft.generate` (KV cache, one jitted decode loop per batch).

model_args: see jaxft/lm_eval_args.py.
"""
from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from jaxft import sharding
from jaxft.lm_eval_args import LMEvalError, build_mesh, check_model_args, config_bos_id
from jaxft.generate import bucket, generate, left_pad, round_up
from jaxft.kvcache import Static
from jaxft.kernels import token_nll
from jaxft.state import load

log = logging.getLogger(__name__)

GEN_KWARGS = ("do_sample", "temperature", "top_k", "top_p")
TOKENS_PER_CHUNK = 512  # scored positions per chunk of logits: [R, C, V] is never whole


# ---------------------------------------------------------------- the jitted scorer

def length_bucket(n: int) -> int:
    """Row length actually run: a power of two up to 256, then a multiple of 256."""
    return bucket(n, 16) if n <= 256 else round_up(n, 256)


def _span_scores(model, h_RxCxD, targets_RxC, mask_RxC, chunk: int):
    """Per span r: the sum of log p(target) over its masked-in slots (the hidden state at
    slot c predicts target c), and whether every such target was the argmax. The logits exist
    one chunk of slots at a time."""
    r, c = targets_RxC.shape

    def one(xs):
        h_RxKxD, tgt_RxK, m_RxK = xs
        logits_RxKxV = model.logits(h_RxKxD)
        lp_RxK = jnp.where(m_RxK, -token_nll(logits_RxKxV, tgt_RxK), 0.0)
        hit_RxK = (jnp.argmax(logits_RxKxV, axis=-1) == tgt_RxK) | ~m_RxK
        return jnp.sum(lp_RxK, axis=-1), jnp.all(hit_RxK, axis=-1)

    def chunks(x):  # [R, C, ...] -> [C / chunk, R, chunk, ...]
        return jnp.moveaxis(x.reshape(r, c // chunk, chunk, *x.shape[2:]), 1, 0)

    lp_NxR, greedy_NxR = jax.lax.map(one, (chunks(h_RxCxD), chunks(targets_RxC), chunks(mask_RxC)))
    return lp_NxR.sum(0), greedy_NxR.all(0)


@partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score(graphdef, state, ids_BxL, row_R, start_R, targets_RxC, mask_RxC, *, chunk: int):
    """Span r: the C target slots of row row_R[r] from slot start_R[r], one full forward."""
    model = nnx.merge(graphdef.graphdef, state)
    h_BxLxD, _ = model.hidden(ids_BxL)
    c = targets_RxC.shape[1]
    slots_RxC = jnp.minimum(start_R[:, None] + jnp.arange(c), ids_BxL.shape[1] - 1)
    return _span_scores(model, h_BxLxD[row_R[:, None], slots_RxC], targets_RxC, mask_RxC, chunk)


@partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_shared(graphdef, state, ctx_BxP, pos_BxP, seg_BxP, row_R, targets_RxC, mask_RxC, *,
                  chunk: int):
    """Continuations that share a context: each (left-padded) context is prefilled once into a
    KV cache, whose rows are then repeated for the continuations row_R points them to."""
    model = nnx.merge(graphdef.graphdef, state)
    (b, p), c = ctx_BxP.shape, targets_RxC.shape[1]
    h_BxPxD, cache = model.hidden(ctx_BxP, pos_BxP, seg_BxP, model.init_cache(b, p + c))
    cache = {"k": cache["k"][:, row_R], "v": cache["v"][:, row_R],
             "segment_ids": cache["segment_ids"][row_R], "index": cache["index"]}
    pos_RxC = pos_BxP[row_R, -1:] + 1 + jnp.arange(c)
    h_RxCxD, _ = model.hidden(targets_RxC, pos_RxC, jnp.ones_like(targets_RxC), cache)
    # Target 0 is predicted by the context's last slot, target c by continuation slot c - 1.
    h_RxCxD = jnp.concatenate([h_BxPxD[row_R, -1:], h_RxCxD[:, :-1]], axis=1)
    return _span_scores(model, h_RxCxD, targets_RxC, mask_RxC, chunk)


# ---------------------------------------------------------------- the lm-eval model

@register_model("jaxft")
class JaxftLM(TemplateLM):
    """A jaxft model directory behind lm-eval's three request types."""

    FIRST_ROUND = 64  # new tokens in a batch's first decode; later rounds double

    def __init__(self, **model_args):
        super().__init__()
        a = check_model_args(model_args)
        d, self.batch_size, self.max_length = a["path"], a["batch_size"], a["max_length"]
        self.path, self._max_gen_toks, self.seed = str(d), a["max_gen_toks"], a["seed"]
        self.mesh = build_mesh(a["mesh"])
        if a["device"] is not None:
            log.info("jaxft lm-eval: device=%s ignored; the mesh places the model", a["device"])
        loaded = load(d, self.mesh)
        self.model, self.tok, self.cfg = loaded.model, loaded.tokenizer, loaded.config
        graphdef, self._state = nnx.split(self.model)
        self._graphdef = Static(graphdef)
        dp = int(np.prod([self.mesh.shape[ax] for ax in sharding.RULES["batch"]]))
        self._rows = round_up(self.batch_size, dp)  # every scoring batch has this many rows
        bos = config_bos_id(d / "tokenizer", self.tok)
        self._prefix = a["prefix_token_id"] if a["prefix_token_id"] is not None else (
            self.tok.eos_id if bos is None else bos)
        self._eos_text = self.tok.decode([self.tok.eos_id])
        self._pieces: list[str] | None = None  # each token's text, for stop-token sets
        self.truncated = {"loglikelihood": 0, "generate_until": 0}  # left-truncated requests

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # model_args win over the harness's own flags (its --batch_size defaults to 1).
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kw):
        """As the hf backend: BOS first when the tokenizer uses one, unless the text starts
        with it already."""
        add = add_special_tokens
        if add is None:
            prefix = self.tok.decode([self._prefix])
            add = not (prefix and string.startswith(prefix))
        ids = self.tok.encode(string)
        if add and self.tok.bos_id is not None:
            ids = [self.tok.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special=skip_special_tokens)

    def _note_truncated(self, kind: str, n: int, total: int, limit: int) -> None:
        self.truncated[kind] += n
        if n:
            log.warning("jaxft lm-eval: %d of %d %s requests were longer than %d tokens and were "
                        "left-truncated (as the hf backend does)", n, total, kind, limit)

    # ------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """Contexts with several continuations (multiple choice) run once each, through the KV
        cache; every other request is one row of a plain forward."""
        by_ctx: dict[tuple, list[int]] = {}
        items, n_long = [], 0
        for k, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise LMEvalError(f"a continuation of {len(cont)} tokens is longer than "
                                  f"max_length={self.max_length}")
            full = ctx + cont
            n_long += len(full) > self.max_length + 1
            if len(full) <= self.max_length + 1:
                by_ctx.setdefault(tuple(ctx), []).append(k)
            items.append((tuple(full[-(self.max_length + 1):][:-1]), cont))
        self._note_truncated("loglikelihood", n_long, len(items), self.max_length)
        groups = [(ctx, [(k, requests[k][2]) for k in ks]) for ctx, ks in by_ctx.items()
                  if len(ks) > 1]
        shared = {k for _, conts in groups for k, _ in conts}
        plain = [k for k in range(len(items)) if k not in shared]
        out: list = [None] * len(items)
        for k, ans in zip(plain, self._score_items([items[k] for k in plain])):
            out[k] = ans
        self._score_contexts(groups, out)
        for (req, _, _), ans in zip(requests, out):
            if req is not None:
                self.cache_hook.add_partial("loglikelihood", req, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text in disjoint windows of max_length tokens (lm-eval's own windowing); the
        windows of all texts are batched together."""
        items, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, windows):
                items.append((tuple((ctx + cont)[:-1]), cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score_items(items)):
            totals[i] += lp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def _score_items(self, items: list[tuple[tuple, list[int]]]) -> list[tuple[float, bool]]:
        """(log p(cont | inp's prefix), is_greedy) per (inp, cont), one full forward per row;
        inputs sorted longest first, each distinct input run once."""
        rows = sorted({inp for inp, _ in items}, key=lambda t: (-len(t), t))
        index = {inp: i for i, inp in enumerate(rows)}
        by_row: list[list[int]] = [[] for _ in rows]
        for k, (inp, _) in enumerate(items):
            by_row[index[inp]].append(k)
        out: list = [None] * len(items)
        for lo in range(0, len(rows), self.batch_size):
            batch = rows[lo:lo + self.batch_size]
            reqs = [(b, k) for b in range(len(batch)) for k in by_row[lo + b]]
            lp, greedy = self._score_batch(batch, [(b, items[k][1]) for b, k in reqs])
            for (_, k), x, g in zip(reqs, lp, greedy):
                out[k] = (float(x), bool(g))
        return out

    def _score_contexts(self, groups, out: list) -> None:
        """Fills out[k] for each (context, [(k, continuation), ...]), longest contexts first."""
        groups = sorted(groups, key=lambda g: (-len(g[0]), g[0]))
        for lo in range(0, len(groups), self.batch_size):
            batch = groups[lo:lo + self.batch_size]
            spans = [(b, k, cont) for b, (_, conts) in enumerate(batch) for k, cont in conts]
            ids, pos, seg = left_pad([ctx for ctx, _ in batch], self._rows,
                                     length_bucket(len(batch[0][0])))
            args = [jax.device_put(a, sharding.batch_sharding(self.mesh)) for a in (ids, pos, seg)]
            lp, greedy = self._run_spans(_score_shared, args, [(b, c) for b, _, c in spans])
            for (_, k, _), x, g in zip(spans, lp, greedy):
                out[k] = (float(x), bool(g))

    def _run_spans(self, fn, args, spans: list[tuple[int, list[int]]], offsets=None):
        """fn's (logprob, is_greedy) per span (row, targets), with spans and targets padded to
        bucketed counts; `offsets` (row slot of each span's first target) for plain rows."""
        n, c = bucket(len(spans), 8), bucket(max(len(t) for _, t in spans), 8)
        row, tgt, mask = np.zeros(n, np.int32), np.zeros((n, c), np.int32), np.zeros((n, c), bool)
        for j, (i, cont) in enumerate(spans):
            row[j], tgt[j, :len(cont)], mask[j, :len(cont)] = i, cont, True
        extra = [] if offsets is None else [np.pad(np.int32(offsets), (0, n - len(spans)))]
        with sharding.activation_mesh(self.mesh):
            lp, greedy = fn(self._graphdef, self._state, *args, row, *extra, tgt, mask,
                            chunk=max(1, min(c, TOKENS_PER_CHUNK // n)))
        return np.asarray(lp)[:len(spans)], np.asarray(greedy)[:len(spans)]

    def _score_batch(self, rows: list[tuple], spans: list[tuple[int, list[int]]]):
        ids = np.zeros((self._rows, length_bucket(len(rows[0]))), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        ids = jax.device_put(ids, sharding.batch_sharding(self.mesh))
        return self._run_spans(_score, [ids], spans,
                               offsets=[len(rows[i]) - len(cont) for i, cont in spans])

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        coll = Collator([r.args for r in requests],
                        sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                        group_by="gen_kwargs", group_fn=lambda x: x[1])
        out, n_long = [], 0
        for k, chunk in enumerate(coll.get_batched(n=self.batch_size)):
            contexts, kwargs = zip(*chunk)
            texts, n = self._generate_batch(list(contexts), kwargs[0], self.seed + 1000 * k)
            out += texts
            n_long += n
            for ctx, text in zip(contexts, texts):
                self.cache_hook.add_partial("generate_until", (ctx, kwargs[0]), text)
        self._note_truncated("generate_until", n_long, len(requests),
                             self.max_length - self.max_gen_toks)
        return coll.get_original(out)

    def _sampling(self, kw: dict) -> dict:
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise LMEvalError(f"gen_kwargs {', '.join(unknown)}: not supported by the jaxft "
                              f"backend (it takes until, max_gen_toks, {', '.join(GEN_KWARGS)})")
        temperature = float(kw.get("temperature", 1.0))
        if not kw.get("do_sample") or temperature <= 0.0:
            return {"temperature": 0.0}
        return {"temperature": temperature, "top_k": int(kw.get("top_k") or 0),
                "top_p": float(kw.get("top_p") or 1.0)}

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict, seed: int):
        """(texts, number of left-truncated contexts) for one batch with shared gen_kwargs."""
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kw.pop("until", None), eos=self._eos_text)
        max_gen = kw.pop("max_gen_toks")
        sampling = self._sampling(kw)
        max_ctx = self.max_length - max_gen
        if max_ctx < 1:
            raise LMEvalError(f"max_gen_toks={max_gen} leaves no room for a context within "
                              f"max_length={self.max_length}")
        prompts = [self.tok_encode(c) or [self._prefix] for c in contexts]
        n_long = sum(len(p) > max_ctx for p in prompts)
        new = self._generate_ids([p[-max_ctx:] for p in prompts], max_gen, until, seed, sampling)
        texts = [postprocess_generated_text(self.tok.decode(ids, skip_special=True), until, None)
                 for ids in new]
        return texts, n_long

    def _stop_ids(self, until: tuple[str, ...]) -> set[int]:
        """EOS and every token whose own text holds a stop string: a row that emits one is
        finished, so decoding stops there instead of running to max_gen_toks."""
        if self._pieces is None:
            n = min(len(self.tok), self.cfg.vocab_size)
            self._pieces = [self.tok.decode([i], skip_special=True) for i in range(n)]
        stops = [s for s in until if s]
        return {i for i, p in enumerate(self._pieces) if any(s in p for s in stops)} | {
            self.tok.eos_id}

    def _generate_ids(self, prompts, max_gen: int, until: list[str], seed: int, sampling: dict):
        """New tokens per prompt, decoded in rounds: a row whose text holds a stop string that
        no single token does is only seen to be done between rounds, so rounds start short
        and double; the rows still going continue from their prompt plus what they have."""
        stop = self._stop_ids(tuple(until))
        gen: list[list[int]] = [[] for _ in prompts]
        active, n_new, step = list(range(len(prompts))), min(max_gen, self.FIRST_ROUND), 0
        while active:
            new = generate(self.model, [prompts[i] + gen[i] for i in active], n_new,
                           eos_ids=(self.tok.eos_id,), stop_ids=stop, keep_stop=True,
                           seed=seed + step, **sampling)
            left = []
            for i, toks in zip(active, new):
                gen[i] += toks
                text = self.tok.decode(gen[i], skip_special=True)
                if not (toks[-1] in stop or len(gen[i]) >= max_gen
                        or postprocess_generated_text(text, until, None) != text):
                    left.append(i)
            active, step = left, step + 1
            if active:
                n_new = min(2 * n_new, max_gen - len(gen[active[0]]))
        return gen
