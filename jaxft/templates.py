"""Prompt templates, and the one transform that turns a record into token ids and a loss mask.

A record is a dict with `instruction`, `input` (may be "") and `output`. A template splits it
into `prompt(ex)` (everything the model is given) and `response(ex)` (what it must produce,
with any closing marker such as `<END_A>`, without EOS). Built-ins: alpaca, phi3,
special-tokens, llama2-chat; or a YAML file:

    prompt: "<Q>{instruction}\\n{input}</Q>"   # str.format over instruction / input / output
    prompt_no_input: "<Q>{instruction}</Q>"     # optional: used when input is ""
    prompt_no_instruction: "<Q>{input}</Q>"     # optional: used when instructions are left out
    response: "{output}</A>"
    special_tokens: ["<Q>", "</Q>", "</A>"]     # optional: added to the tokenizer
"""
from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import numpy as np
import yaml

from jaxft.errors import TemplateError

FIELDS = ("instruction", "input", "output")
TRAIN_ON = ("response", "all", "assistant", "last_assistant")  # the last two: chat names
SEED_MARKERS = ("<START_Q>", "<END_Q>", "<START_A>", "<END_A>")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    prompt_fmt: str  # used when the record has an input (and instructions are included)
    response_fmt: str
    prompt_no_input: str | None = None  # for input == ""; None: prompt_fmt with input ""
    prompt_no_instruction: str | None = None  # for include_instruction=False; None: always include
    special_tokens: tuple[str, ...] = ()
    include_instruction: bool = True

    def _require(self, ex: dict, *fmts: str | None) -> None:
        for field in (f for fmt in fmts if fmt for f in _fields_of(fmt)):
            if field not in ex:
                where = f" at line {ex['line']}" if "line" in ex else ""  # set by task readers
                raise TemplateError(f"record{where} has no field {field!r} (template {self.name}); "
                                    f"it has {sorted(ex)}")

    def prompt(self, ex: dict) -> str:
        self._require(ex, self.prompt_fmt, self.prompt_no_input, self.prompt_no_instruction)
        fmt = self.prompt_fmt
        if not ex.get("input") and self.prompt_no_input is not None:
            fmt = self.prompt_no_input
        elif (not self.include_instruction or not ex.get("instruction")) and ex.get("input"):
            fmt = self.prompt_no_instruction or fmt
        return fmt.format(**ex)

    def response(self, ex: dict) -> str:
        self._require(ex, self.response_fmt)
        return self.response_fmt.format(**ex)


_ALPACA_HEAD = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}")

BUILTIN = {
    # LLMs-from-scratch ch07 `format_input`, then "\n\n### Response:\n".
    "alpaca": Template("alpaca", _ALPACA_HEAD + "\n\n### Input:\n{input}\n\n### Response:\n", "{output}",
                       prompt_no_input=_ALPACA_HEAD + "\n\n### Response:\n"),
    # ch07's Phi-3 style; the role tags stay plain text, as there.
    "phi3": Template("phi3", "<|user|>\n{instruction}\n{input}\n<|assistant|>\n", "{output}",
                     prompt_no_input="<|user|>\n{instruction}\n<|assistant|>\n"),
    # The seed's lean prompt: the question between added markers, the task instruction optional.
    "special-tokens": Template("special-tokens", "<START_Q>{instruction}\n{input}<END_Q><START_A>",
                               "{output}<END_A>", prompt_no_input="<START_Q>{instruction}<END_Q><START_A>",
                               prompt_no_instruction="<START_Q>{input}<END_Q><START_A>",
                               special_tokens=SEED_MARKERS),
    # ChatML (SmolLM2, Qwen): role-tagged turns; the tokenizer's EOS must be <|im_end|>, which
    # then closes the assistant turn. An instruct model already knows this layout and its stop.
    "chatml": Template("chatml", "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n"
                       "{input}<|im_end|>\n<|im_start|>assistant\n", "{output}",
                       prompt_no_input="<|im_start|>user\n{instruction}<|im_end|>\n"
                       "<|im_start|>assistant\n",
                       prompt_no_instruction="<|im_start|>user\n{input}<|im_end|>\n"
                       "<|im_start|>assistant\n",
                       special_tokens=("<|im_start|>", "<|im_end|>")),
    # Meta's Llama-2 chat layout, instruction as the system prompt. The prompt stops at
    # "[/INST]": SentencePiece's dummy prefix gives the answer its leading "▁", the tokens of
    # Meta's "[/INST] {answer}"; a trailing space here would become a lone "▁" token.
    "llama2-chat": Template("llama2-chat", "[INST] <<SYS>>\n{instruction}\n<</SYS>>\n\n{input} [/INST]",
                            "{output}", prompt_no_input="[INST] {instruction} [/INST]",
                            prompt_no_instruction="[INST] {input} [/INST]"),
}

_YAML_KEYS = ("prompt", "response", "prompt_no_input", "prompt_no_instruction", "special_tokens")


def _fields_of(fmt: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]


def load_yaml_template(path: str | Path, include_instruction: bool = True) -> Template:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise TemplateError(f"{path}: expected a mapping with keys {', '.join(_YAML_KEYS)}")
    unknown = sorted(set(spec) - set(_YAML_KEYS))
    if unknown:
        raise TemplateError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_YAML_KEYS)}")
    for key in ("prompt", "response"):
        if key not in spec:
            raise TemplateError(f"{path}: missing key {key!r}")
    for key in _YAML_KEYS[:4]:
        fmt = spec.get(key)
        if fmt is None:
            continue
        if not isinstance(fmt, str):
            raise TemplateError(f"{path}: {key} must be a string")
        try:
            bad = [f for f in _fields_of(fmt) if f not in FIELDS]
        except ValueError as e:  # unbalanced braces
            raise TemplateError(f"{path}: {key}: {e} (write literal braces as {{{{ }}}})") from None
        if bad:
            raise TemplateError(f"{path}: {key} uses {{{bad[0]}}}; fields are {', '.join(FIELDS)}")
    tokens = spec.get("special_tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise TemplateError(f"{path}: special_tokens must be a list of non-empty strings")
    return Template(path.stem, spec["prompt"], spec["response"], spec.get("prompt_no_input"),
                    spec.get("prompt_no_instruction"), tuple(tokens), include_instruction)


def get_template(name_or_path: str, include_instruction: bool = True) -> Template:
    if name_or_path in BUILTIN:
        return dataclasses.replace(BUILTIN[name_or_path], include_instruction=include_instruction)
    if name_or_path.endswith((".yaml", ".yml")):
        if not Path(name_or_path).is_file():
            raise TemplateError(f"template file {name_or_path} does not exist")
        return load_yaml_template(name_or_path, include_instruction)
    raise TemplateError(f"unknown template {name_or_path!r}; built-ins: {', '.join(BUILTIN)}, "
                        "or a path to a .yaml file")


def _check_tokens(tok, template: Template) -> None:
    missing = [t for t in template.special_tokens if tok.token_id(t) is None]
    if missing:
        raise TemplateError(f"tokenizer lacks {missing} of template {template.name}; "
                            "call tok.add_special_tokens(template.special_tokens) first")


def prompt_ids(tok, template: Template, ex: dict) -> list[int]:
    """What generation starts from: BOS (if the tokenizer uses one) + the encoded prompt."""
    if getattr(template, "is_chat", False):  # jaxft.chat.ChatTemplate renders its own BOS
        return template.prompt_ids(tok, ex)
    _check_tokens(tok, template)
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(template.prompt(ex))


def tokenize_example(tok, template: Template, ex: dict, train_on: str = "response") -> dict:
    """Templates, tokenizes and masks one record; the only place the loss mask is decided.

    ids = [BOS] + encode(prompt) + encode(response) + [EOS], prompt and response encoded
    separately (as in generation, so training never sees a token straddling the prompt end).
    mask[i] = 1 where ids[i] is a training target: the response and EOS always, the prompt
    only with train_on="all", BOS never. With the special-tokens template,

        ex = {"instruction": "", "input": "Is it fun?", "output": "yes"}
        prompt "<START_Q>Is it fun?<END_Q><START_A>", response "yes<END_A>"
        ids  = [<s>, <START_Q>, I, s, ▁i, t, ▁, f, u, n, ?, <END_Q>, <START_A>, ▁y, es, <END_A>, </s>]
        mask = [  0,         0, 0, 0,  0, 0, 0, 0, 0, 0, 0,       0,         0,  1,  1,       1,    1]

    (pieces from a 400-piece SentencePiece model; the data pipeline trains on targets ids[1:]
    with loss mask mask[1:], so <START_A> predicts the first response token.)
    """
    if getattr(template, "is_chat", False):  # conversations: jaxft.chat decides the mask
        return template.tokenize(tok, ex, train_on)
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    head = prompt_ids(tok, template, ex)
    tail = tok.encode(template.response(ex)) + [tok.eos_id]
    has_bos = tok.bos_id is not None
    prompt_mask = [0] * has_bos + [int(train_on == "all")] * (len(head) - has_bos)
    return {"ids": np.asarray(head + tail, np.int32),
            "mask": np.asarray(prompt_mask + [1] * len(tail), np.int32)}


def boundary_ok(tok, template: Template, ex: dict) -> bool:
    """Whether encoding prompt + response in one go starts with exactly the prompt's tokens,
    i.e. puts a token boundary at the prompt end. When it does not (a prompt ending in a space
    before a word), generation would continue from a token split no ordinary text contains."""
    if getattr(template, "is_chat", False):
        return template.boundary_ok(tok, ex)
    prompt = template.prompt(ex)
    head = tok.encode(prompt)
    return tok.encode(prompt + template.response(ex))[:len(head)] == head
