"""Text generation: prompts left-padded into the rows of a fixed-size KV cache, prefilled, then
decoded one token per row per step in a `lax.while_loop` (`jaxft.decoder`), rows refilled with
the next prompts as their answers end.

Left padding lines up every prompt's last token in the final prompt slot, so one prefill
serves the whole batch. Padding slots get segment id 0, which real tokens never attend to, and
each row's positions start at 0 at its first real token, so a padded row computes exactly what
the same prompt alone would.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxft import chat, compile_cache, decoder, kvcache, sharding
from jaxft.config import at_least
from jaxft.decoder import left_pad, sample_logits
from jaxft.kvcache import Static
from jaxft.state import load
from jaxft.tasks import cut_at_stop
from jaxft.templates import get_template, prompt_ids


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (and >= minimum): lengths reuse a handful of compiles."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------- batching

def _model_mesh(model):
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    sh = getattr(leaf, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else None


def _batch_rows(n: int, mesh) -> int:
    """Rows actually run: a power of two up to 8, then a multiple of 8, and a multiple of the
    mesh's data-parallel size."""
    dp = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding.RULES["batch"]]))
    b = bucket(n, 1) if n <= 8 else round_up(n, 8)
    return round_up(b, dp)


def _check_prompts(model, prompts, max_new_tokens):
    if not prompts:
        raise ValueError("generate: no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (the BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"generate: token id {bad[0]} is outside the vocabulary (size {vocab})")


def _cut(rows_BxT: np.ndarray, n: int, stop: set[int], keep_stop: bool = False) -> list[list[int]]:
    out = []
    for row in rows_BxT[:n].tolist():
        end = next((i + (keep_stop and t in stop) for i, t in enumerate(row) if t in stop or t < 0),
                   len(row))
        out.append(row[:end])
    return out


def _split_prefix(prompts, prefix: kvcache.Prefix | None) -> list[list[int]]:
    """Each prompt's tokens after the shared prefix (checked to be there)."""
    if prefix is None or not prefix.ids:
        return [list(p) for p in prompts]
    n = len(prefix.ids)
    if any(tuple(p[:n]) != prefix.ids or len(p) <= n for p in prompts):
        raise ValueError("generate: every prompt must start with the cached prefix and "
                         "have at least one token after it")
    return [list(p[n:]) for p in prompts]


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, eos_ids: Iterable[int] = (),
             stop_ids: Iterable[int] | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, cache_len: int | None = None,
             prefix: kvcache.Prefix | None = None, rows: int | None = None,
             prompt_len: int = 0, keep_stop: bool = False, draft: int = 0) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included), cut before the first EOS or stop
    token (after it with `keep_stop`: a stop token whose text holds more than the stop string)
    and at `max_new_tokens`. Greedy unless `temperature` > 0. `prefix` (from
    `kvcache.prefill_prefix`) is a start every prompt shares, prefilled once. `rows` prompts
    decode at once (default: all of them, padded to a bucket); with fewer rows than prompts,
    a row whose answer ends takes the next prompt (`jaxft.decoder`). `prompt_len` (after the
    prefix) reserves at least that many prompt slots per row; each fill still prefills only
    as wide as its own longest prompt. `draft` > 0 (greedy only): each pass also checks that
    many tokens copied from earlier in the row (prompt lookup, `jaxft.decoder.lookup`) and
    keeps those the model agrees with; the tokens are the same, in fewer passes when the
    answer repeats its prompt."""
    _check_prompts(model, prompts, max_new_tokens)
    stop = sorted(set(eos_ids) | set(stop_ids or ()))
    mesh = _model_mesh(model)
    own = _split_prefix(prompts, prefix)
    rows = _batch_rows(len(prompts), mesh) if rows is None else round_up(rows, _batch_rows(1, mesh))
    # Prompts and output pad to multiples of 16: prefill is the costly part, and few shapes
    # mean few compiles.
    p = round_up(max(prompt_len, *(len(x) for x in own)), 16)
    t = round_up(max_new_tokens, 16)
    if cache_len is not None:
        if cache_len < p + max_new_tokens:
            raise ValueError(f"generate: cache_len={cache_len} is shorter than prompt bucket {p} "
                             f"+ max_new_tokens {max_new_tokens}")
        t = cache_len - p
    if prefix is None:
        prefix = kvcache.prefill_prefix(model, [])
    stop_T = np.full(bucket(len(stop), 8), -2, np.int32)  # -2 matches no token
    stop_T[:len(stop)] = stop
    out = decoder.decode(model, own, prefix, rows=rows, p=p, t=t, stop_T=stop_T,
                         key=jax.random.key(seed), max_new=max_new_tokens, mesh=mesh,
                         sampling=(float(temperature), int(top_k), float(top_p)), draft=draft)
    return _cut(np.stack(out)[:, :max_new_tokens], len(prompts), set(stop), keep_stop)


# ---------------------------------------------------------------- reference without a cache

@partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, state, ids_BxS, pos_BxS, seg_BxS, slot):
    """Logits `[B, V]` at one slot, from a full forward pass without a cache."""
    model = nnx.merge(graphdef.graphdef, state)
    h_BxSxD, _ = model.hidden(ids_BxS, pos_BxS, seg_BxS)
    return model.logits(jax.lax.dynamic_slice_in_dim(h_BxSxD, slot, 1, axis=1))[:, 0]


def generate_no_cache(model, prompts: list[list[int]], max_new_tokens: int, *,
                      eos_ids: Iterable[int] = (), stop_ids: Iterable[int] | None = None,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0) -> list[list[int]]:
    """The slow path: a Python loop that runs the whole sequence through the model for every
    new token (one fixed-shape forward, compiled once). Reference for tests and benchmarks."""
    _check_prompts(model, prompts, max_new_tokens)
    stop = set(eos_ids) | set(stop_ids or ())
    b, p = len(prompts), max(len(x) for x in prompts)
    ids, pos, seg = left_pad(prompts, b, p)
    # New tokens are appended after the prompt slots; causality hides the unfilled ones.
    ids = np.pad(ids, ((0, 0), (0, max_new_tokens)))
    seg = np.pad(seg, ((0, 0), (0, max_new_tokens)), constant_values=1)
    pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(max_new_tokens)], axis=1)
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    done = np.zeros(b, bool)
    out = np.full((b, max_new_tokens), -1, np.int32)
    for step in range(max_new_tokens):
        logits_BxV = _logits_at(Static(graphdef), state, ids, pos, seg, p + step - 1)
        tok = np.asarray(sample_logits(jax.random.fold_in(key, step), logits_BxV, temperature,
                                       top_k, top_p))
        tok = np.where(done, -1, tok)
        out[:, step] = tok
        ids[:, p + step] = np.maximum(tok, 0)
        done |= np.isin(tok, list(stop))
        if done.all():
            break
    return _cut(out, b, stop)


# ---------------------------------------------------------------- text in, text out

DRAFT = 4  # prompt-lookup drafts a pass for `jaxft generate` (one prompt, greedy)
MIN_PREFIX = 32  # shorter shared starts are not worth a prefix cache of their own


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest start common to every prompt that leaves each at least one token of its
    own; empty when there is a single prompt or the start is under MIN_PREFIX tokens."""
    if len(prompts) < 2:
        return []
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return list(first[:n]) if n >= MIN_PREFIX else []


def generate_text(model, tok, template, records: list[dict], max_new_tokens: int,
                  stop_strings: Iterable[str] = (), *, batch_size: int = 8,
                  prompts: list[list[int]] | None = None, **sampling) -> list[str]:
    """The generated text for each record's prompt (tokenised as in training), cut at the first
    stop string. `prompts` overrides the token ids (few-shot prompts are built by the caller).

    `batch_size` rows decode at once, each taking the next prompt when its answer ends;
    prompts start longest first (answers grow with the prompt, so the long ones do not run on
    alone at the end); a start shared by every prompt (few-shot examples) is prefilled once."""
    if prompts is None:
        prompts = [prompt_ids(tok, template, ex) for ex in records]
    stop_strings = tuple(stop_strings)
    # A stop string that is one token (a template's end marker) also ends decoding early.
    stop_ids = [i for i in map(tok.token_id, stop_strings) if i is not None]
    prefix = kvcache.prefill_prefix(model, shared_prefix(prompts))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    new = generate(model, [prompts[i] for i in order], max_new_tokens, eos_ids=(tok.eos_id,),
                   stop_ids=stop_ids, prefix=prefix, rows=min(batch_size, len(prompts)),
                   **sampling)
    texts: list[str] = [""] * len(prompts)
    for i, ids in zip(order, new):
        texts[i] = cut_at_stop(tok.decode(ids), stop_strings)
    return texts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a model directory")
    p.add_argument("--ckpt", required=True, help="model directory (jaxft convert or a train export)")
    ask = p.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", help="the instruction (or raw text without --template)")
    ask.add_argument("--messages", metavar="FILE.json", help="a conversation (a JSON list of "
                     "{role, content}, or an object with `messages`), rendered with the model's "
                     "chat template and add_generation_prompt; stops at the template's turn end")
    ask.add_argument("--chat", metavar="TEXT", help="one user turn, rendered as --messages is")
    p.add_argument("--input", default="", help="the input field, for templates that have one")
    p.add_argument("--template", default="", help="prompt template name; empty: raw text after BOS")
    p.add_argument("--chat-template", default="", metavar="FILE.jinja",
                   help="with --messages/--chat: this template instead of the tokenizer's")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=at_least(0), default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft", type=at_least(0), default=DRAFT, metavar="K",
                   help="greedy: check K prompt-lookup draft tokens a pass (0: off); the "
                   f"tokens are the same either way (default {DRAFT})")
    p.set_defaults(func=main)


def main(args) -> int:
    compile_cache.enable()
    loaded = load(args.ckpt, need_tokenizer=True)
    tok = loaded.tokenizer
    stops = ()
    if args.messages is not None or args.chat is not None:
        chat.apply_override(tok, args.chat_template)
        template = chat.get_template(chat.NAME, tok=tok)
        messages = chat.read_messages(args.messages) if args.messages is not None else \
            [{"role": "user", "content": args.chat}]
        ids, stops = template.prompt_ids(tok, {"messages": messages}), template.stops()
    elif args.template:
        ex = {"instruction": args.prompt, "input": args.input, "output": ""}
        ids = prompt_ids(tok, get_template(args.template), ex)
    else:
        ids = [tok.bos_id] * (tok.bos_id is not None) + tok.encode(args.prompt)
    stop_ids = [i for i in map(tok.token_id, stops) if i is not None]
    new = generate(loaded.model, [ids], args.max_new_tokens, eos_ids=(tok.eos_id,),
                   stop_ids=stop_ids, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, draft=args.draft)
    print(cut_at_stop(tok.decode(new[0], skip_special=True), stops))
    return 0
