"""Chat templates: a model's own Jinja chat template, rendered the way transformers renders it,
and the chat loss mask, decided here and nowhere else.

A conversation is a list of messages `{"role", "content", ...}`. `ChatTemplate.tokenize` renders
it once and tokenises the text in one go, so its ids equal transformers'
`apply_chat_template(messages, tokenize=True)`. A token is a target when its characters overlap
an assistant span of the rendered text. The spans come from the template's `{% generation %}`
blocks when it has them (then the mask equals transformers' `return_assistant_tokens_mask`),
else from rendering turn by turn: assistant turn k spans from the end of
render(messages[:k], add_generation_prompt=True) to the end of render(messages[:k+1]), i.e. the
reply plus whatever the template closes the turn with. Nothing is found by searching the text.
With SmolLM2's ChatML template:

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text     = "<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n"
               "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n"
    targets  = Hello ! <|im_end|> \\n        (every other token: mask 0)

train_on: `assistant` (every assistant turn; `response` means the same), `last_assistant` (only
the final one), `all` (every token). System, user and tool turns are never targets otherwise.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import re
import traceback
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxft import templates
from jaxft.tasks import DataError, read_text
from jaxft.templates import TemplateError

TRAIN_ON = ("assistant", "last_assistant", "all", "response")  # response: as assistant
NAME = "tokenizer"  # data.template value that selects the tokenizer's own chat template
_SPANS = contextvars.ContextVar("jaxft_chat_spans", default=None)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the template marks its replies
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"}]


class _Tracker:
    """Output length so far and the (start, end) character span of each generation block."""

    def __init__(self):
        self.length, self.spans = 0, []


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a render
    is tracked, records where the body landed in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track", []), [], [], body).set_lineno(lineno)

    def _track(self, caller):
        text = caller()
        tracker = _SPANS.get()
        if tracker is not None:
            # Everything rendered before this block has already been streamed out.
            tracker.spans.append((tracker.length, tracker.length + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: plain json.dumps, without Jinja's HTML escaping.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _no_private(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set the attribute {name!r}")


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes (no route to Python internals)."""

    def __init__(*args, **kwargs):  # same calling trick as jinja's Namespace
        for name in dict(*args[1:], **kwargs):
            _no_private(name)
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name, value):
        _no_private(name)
        super().__setitem__(name, value)


class _Dict:
    """dict() for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{origin}:{e.lineno}: chat template syntax error: {e.message}") from None


def _template_line(exc: BaseException) -> str:
    """':N' for the template line an error was raised from (jinja rewrites those frames)."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return f":{lines[-1]}" if lines else ""


def _where(ex: dict) -> str:
    if "file" in ex:
        return f"{ex['file']}:{ex.get('line', '?')}"
    return f"record at line {ex['line']}" if "line" in ex else "the conversation"


def read_template_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TemplateError(f"chat template file {p} does not exist")
    return p.read_text(encoding="utf-8")


def apply_override(tok, path: str) -> None:
    """data.chat_template: the tokenizer renders (and is saved) with this file's template."""
    if path:
        tok.chat_template, tok.chat_template_origin = read_template_file(path), str(path)


def template_tokens(tok) -> dict[str, str]:
    """bos_token / eos_token / ... as the template sees them: the tokenizer config's strings,
    else the tokenizer's own pieces."""
    out = {k: v for k, v in (getattr(tok, "special_text", None) or {}).items() if v}
    if "bos_token" not in out and tok.bos_id is not None:
        out["bos_token"] = tok.id_to_piece(tok.bos_id)
    out.setdefault("eos_token", tok.id_to_piece(tok.eos_id))
    return out


def _clean(messages) -> list[dict]:
    # As transformers does: a key set to None reads as absent (OpenAI exports write content=None).
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _last_assistant(messages) -> int | None:
    return next((k for k in range(len(messages) - 1, -1, -1)
                 if messages[k].get("role") == "assistant"), None)


def _token_mask(offsets, spans) -> np.ndarray:
    """1 for every token whose characters overlap one of the spans."""
    mask = np.zeros(len(offsets), np.int32)
    if len(offsets) and spans:
        off = np.asarray(offsets, np.int64).reshape(-1, 2)
        for start, end in spans:
            mask |= ((off[:, 0] < end) & (off[:, 1] > start)).astype(np.int32)
    return mask


@dataclasses.dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A Jinja chat template bound to its source and to the tokenizer's special-token strings.
    Records are chat records (`messages`, `extra`) or instruction records, which become a
    system (the instruction, if included) / user / assistant conversation."""

    source: str
    origin: str  # where the template came from, for errors: a file, or the tokenizer dir
    tokens: dict  # bos_token, eos_token, ... passed to the template
    include_instruction: bool = True
    name: str = NAME
    special_tokens: tuple[str, ...] = ()
    is_chat = True  # templates.tokenize_example and friends hand chat templates here

    def conversation(self, ex: dict) -> list[dict]:
        if "messages" in ex:
            return _clean(ex["messages"])
        instruction, text = ex.get("instruction", ""), ex.get("input", "")
        msgs = []
        if text and instruction and self.include_instruction:
            msgs.append({"role": "system", "content": instruction})
        msgs.append({"role": "user", "content": text or instruction})
        if ex.get("output"):
            msgs.append({"role": "assistant", "content": ex["output"]})
        return msgs

    def render(self, messages: list[dict], extra: dict | None = None,
               add_generation_prompt: bool = False, where: str = "") -> tuple[str, list]:
        """(text, generation-block spans) exactly as transformers renders it."""
        if not self.source:
            raise TemplateError("chat template used before it was bound to a tokenizer")
        compiled = _compile(self.source, self.origin)
        ctx = {**self.tokens, "tools": None, "documents": None, **(extra or {}),
               "messages": messages, "add_generation_prompt": add_generation_prompt}
        tracker, parts = _Tracker(), []
        reset = _SPANS.set(tracker)
        try:
            for block in compiled.generate(**ctx):
                parts.append(block)
                tracker.length += len(block)
        except TemplateError:
            raise
        except Exception as e:  # the template's raise_exception, or data it cannot handle
            msg = e.message if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise TemplateError(f"{self.origin}{_template_line(e)}: {msg} "
                                f"(rendering {where or 'a conversation'})") from None
        finally:
            _SPANS.reset(reset)
        return "".join(parts), tracker.spans

    def _turn_spans(self, messages, extra, text, which, where) -> list[tuple[int, int]]:
        """Assistant spans by rendering turn by turn; `which` are the assistant indices."""
        spans = []
        for k in which:
            head = self.render(messages[:k], extra, True, where)[0]
            upto = self.render(messages[:k + 1], extra, False, where)[0]
            if not (text.startswith(upto) and upto.startswith(head)):
                raise TemplateError(
                    f"{self.origin}: the template renders the start of {where} differently once "
                    f"later turns follow (turn {k + 1}), so turns cannot be rendered one by one; "
                    "mark the assistant replies with {% generation %} ... {% endgeneration %}")
            spans.append((len(head), len(upto)))
        return spans

    def tokenize(self, tok, ex: dict, train_on: str = "assistant") -> dict:
        """{"ids", "mask"} int32 for one conversation; the only place the chat mask is set."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        messages, extra, where = self.conversation(ex), ex.get("extra"), _where(ex)
        text, gen_spans = self.render(messages, extra, False, where)
        ids, offsets = tok.encode_offsets(text)
        if train_on == "all":
            mask = np.ones(len(ids), np.int32)
        else:
            if _GENERATION.search(self.source):
                spans = gen_spans
            else:
                which = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
                spans = self._turn_spans(messages, extra, text, which[-1:] if train_on ==
                                         "last_assistant" else which, where)
            mask = _token_mask(offsets, spans[-1:] if train_on == "last_assistant" else spans)
        return {"ids": np.asarray(ids, np.int32), "mask": mask}

    def fit(self, tok, ex: dict, train_on: str, keep: int) -> dict | None:
        """An over-long conversation cut by whole turns from the end, so it ends after the
        last assistant turn that fits in `keep` ids; None when not even the first one fits."""
        messages = self.conversation(ex)
        ends = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        for k in reversed(ends):
            out = self.tokenize(tok, {**ex, "messages": messages[:k + 1]}, train_on)
            if len(out["ids"]) <= keep:
                return out
        return None

    def prompt_messages(self, ex: dict) -> list[dict]:
        """What generation is given: the conversation before its final assistant turn (all
        of it when it ends on another role)."""
        messages = self.conversation(ex)
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1]
        return messages

    def prompt(self, ex: dict) -> str:
        return self.render(self.prompt_messages(ex), ex.get("extra"), True, _where(ex))[0]

    def response(self, ex: dict) -> str:
        messages = self.conversation(ex)
        last = _last_assistant(messages)
        return "" if last is None else str(messages[last].get("content", ""))

    def prompt_ids(self, tok, ex: dict) -> list[int]:
        return tok.encode_offsets(self.prompt(ex))[0]

    def stops(self) -> tuple[str, ...]:
        """The text the template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
        `</s>`), from rendering a probe exchange; generation stops there."""
        head = self.render(PROBE[:1], None, True, "a probe exchange")[0]
        upto = self.render(PROBE, None, False, "a probe exchange")[0]
        reply = upto[len(head):].lstrip() if upto.startswith(head) else ""
        end = reply[len(PROBE[1]["content"]):].strip() if reply.startswith("Ok") else ""
        return (end,) if end else ()

    def turns(self, tok, ex: dict, train_on: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(role, ids, mask) per turn of the encoded conversation, for `jaxft audit`: a token
        belongs to the turn whose rendered prefix it starts after."""
        messages, extra, where = self.conversation(ex), ex.get("extra"), _where(ex)
        enc = self.tokenize(tok, ex, train_on)
        text = self.render(messages, extra, False, where)[0]
        starts = [len(self.render(messages[:k], extra, False, where)[0])
                  for k in range(1, len(messages))]
        if not all(text.startswith(self.render(messages[:k + 1], extra, False, where)[0])
                   for k in range(len(messages) - 1)):
            return [("conversation", enc["ids"], enc["mask"])]
        token_starts = np.asarray([s for s, _ in tok.encode_offsets(text)[1]] or [0])
        turn_of = np.searchsorted(np.asarray(starts, np.int64), token_starts, side="right")
        return [(str(m.get("role")), enc["ids"][turn_of == k], enc["mask"][turn_of == k])
                for k, m in enumerate(messages) if (turn_of == k).any()]

    def boundary_ok(self, tok, ex: dict) -> bool:
        """Whether the generation prompt's tokens start the tokens of the whole conversation,
        i.e. training and generation see the same split at the start of the reply."""
        head = self.prompt_ids(tok, ex)
        messages = self.conversation(ex)
        if not messages or messages[-1].get("role") != "assistant":
            return True
        return list(self.tokenize(tok, ex, "all")["ids"][:len(head)]) == list(head)


def get_template(name: str, include_instruction: bool = True, tok=None):
    """templates.get_template, plus `tokenizer`: the tokenizer's own chat template (bound to
    `tok`; without one, an unbound template good only for its empty special_tokens)."""
    if name != NAME:
        return templates.get_template(name, include_instruction)
    if tok is None:
        return ChatTemplate("", "", {}, include_instruction)
    source = getattr(tok, "chat_template", None)
    if not source:
        raise TemplateError("data.template=tokenizer, but the tokenizer has no chat template (none "
                            "in tokenizer_config.json or chat_template.jinja); set "
                            "data.chat_template: FILE.jinja")
    origin = getattr(tok, "chat_template_origin", "") or "the tokenizer's chat template"
    return ChatTemplate(source, origin, template_tokens(tok), include_instruction)


def read_messages(path: str | Path) -> list[dict]:
    """A conversation file for `jaxft generate --messages`: a JSON list of {role, content},
    or an object holding it under `messages`."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise DataError(f"{path}: expected a list of {{\"role\", \"content\"}} objects "
                        "(or an object with one under \"messages\")")
    return _clean(messages)
