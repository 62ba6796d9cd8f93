"""Tokenizers: one small interface, two backends.

`SentencePieceTokenizer` reads a Llama-2 style `tokenizer.model`; `HFTokenizer` reads a
`tokenizer.json` (Llama-3, SmolLM2: byte-level BPE) through the `tokenizers` library. Both
  - never add BOS/EOS in `encode` (the template transform decides where they go),
  - keep added special tokens (template markers such as `<START_Q>`) whole: one id each,
    never split, even glued to text,
  - `save` a directory that `load_tokenizer` and `transformers.AutoTokenizer` both read with
    the same ids.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFCore

from jaxft.errors import OutputExistsError

SP_FILE, HF_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
_USER_DEFINED = sp_pb.ModelProto.SentencePiece.USER_DEFINED
# End-of-sequence pieces tried, in order, when a tokenizer.json comes without a config naming one.
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>")


class Tokenizer:
    """What the rest of jaxft relies on. `bos_id` is None for tokenizers that use no BOS."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    chat_template: str | None = None  # the model's Jinja chat template (jaxft.chat renders it)
    chat_template_origin: str = ""  # where it was read from, for error messages
    special_text: dict | None = None  # bos_token/eos_token/... strings of the tokenizer config

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's (start, end) character offsets in text."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _hf_config(self, tokenizer_class: str, added: dict[int, tuple[str, bool]]) -> dict:
        """tokenizer_config.json in the shape transformers reads (special tokens by content)."""
        piece = lambda i: None if i is None else self.id_to_piece(i)  # noqa: E731
        chat = {"chat_template": self.chat_template} if self.chat_template else {}
        return {
            "tokenizer_class": tokenizer_class, **chat,
            "bos_token": piece(self.bos_id) or (self.special_text or {}).get("bos_token"),
            "eos_token": piece(self.eos_id),
            "pad_token": piece(self.pad_id), "add_bos_token": self.bos_id is not None,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(i): {"content": t, "special": special, "normalized": False,
                                              "lstrip": False, "rstrip": False, "single_word": False}
                                     for i, (t, special) in added.items()},
        }

    def _write(self, out_dir, force: bool, main_file: str, payload: bytes, config: dict) -> Path:
        out = Path(out_dir)
        if (out / main_file).exists() and not force:
            raise OutputExistsError(f"{out / main_file} already exists; pass --force to overwrite it")
        out.mkdir(parents=True, exist_ok=True)
        (out / main_file).write_bytes(payload)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config[k]}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        return out


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Added tokens become USER_DEFINED pieces appended to the model
    itself, so the SentencePiece processor (and HF's converter of tokenizer.model) keeps them whole.

    pad_id: the model's pad piece; Llama-2 has none, then the unk id (or eos without unk).
    Padding is never attended to nor trained on, so which id fills it does not matter.
    """

    def __init__(self, model_proto: bytes):
        self._proto = sp_pb.ModelProto.FromString(model_proto)
        self._load()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def _load(self) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto.SerializeToString())
        sp = self._sp
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if sp.eos_id() < 0:
            raise ValueError("SentencePiece model has no eos piece")
        self.eos_id = sp.eos_id()
        self.pad_id = next(i for i in (sp.pad_id(), sp.unk_id(), sp.eos_id()) if i >= 0)
        self._added = {i: p.piece for i, p in enumerate(self._proto.pieces) if p.type == _USER_DEFINED}
        self._control = {i for i in range(len(self)) if sp.is_control(i)}
        self._space_id = sp.piece_to_id("\u2581")
        self._control_text = {sp.id_to_piece(i): i for i in self._control
                              if sp.id_to_piece(i) not in ("<pad>",)}
        self._control_re = "(" + "|".join(map(re.escape, self._control_text)) + ")" \
            if self._control_text else ""

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def __getstate__(self) -> dict:
        # Grain worker processes get the tokenizer pickled; the proto and processor are not.
        return {**self.__dict__, "_proto": self._proto.SerializeToString(), "_sp": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proto = sp_pb.ModelProto.FromString(state["_proto"])
        self._sp = spm.SentencePieceProcessor(model_proto=state["_proto"])

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        # SentencePiece puts its dummy-prefix space before a leading added token; drop it, as
        # HF's tokenizer converted from this model does (a prompt starting <START_Q> wastes none).
        if len(ids) > 1 and ids[0] == self._space_id and ids[1] in self._added:
            del ids[0]
        return ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Control pieces written as text (`<s>`, `</s>` in a chat template) become their ids,
        as HF's converted tokenizer reads them; the text between them is encoded like `encode`."""
        ids, offsets, pos = [], [], 0
        for part in re.split(self._control_re, text) if self._control_re else [text]:
            if part in self._control_text:
                ids.append(self._control_text[part])
                offsets.append((pos, pos + len(part)))
            elif part:
                enc = self._sp.encode(part, return_type="offset_mapping")
                got, where = list(enc["ids"]), list(enc["offsets"])
                if len(got) > 1 and got[0] == self._space_id and got[1] in self._added:
                    got, where = got[1:], where[1:]  # as in encode: no dummy space before an added token
                ids += got
                offsets += [(pos + int(b), pos + int(e)) for b, e in where]
            pos += len(part)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._control and i not in self._added])
        # SentencePiece renders control pieces (<s>, </s>, <pad>) as ""; show them instead.
        out, run = [], []
        for i in ids:
            if i in self._control:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self._sp.decode(run)])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        new = [t for t in dict.fromkeys(tokens) if self.token_id(t) is None]
        for t in new:
            piece = self._proto.pieces.add()
            piece.piece, piece.type, piece.score = t, _USER_DEFINED, 0.0
        if new:
            self._proto.trainer_spec.vocab_size = len(self._proto.pieces)
            self._load()
        return [self.token_id(t) for t in tokens]

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        config = self._hf_config("LlamaTokenizer", {i: (t, True) for i, t in self._added.items()})
        config["unk_token"] = self._sp.id_to_piece(self._sp.unk_id())
        config["legacy"] = False  # no dummy space after special tokens, as SentencePiece does
        return self._write(out_dir, force, SP_FILE, self._proto.SerializeToString(), config)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json, with the special ids taken from a tokenizer_config.json
    beside it when there is one.

    bos_id: the id the tokenizer's own post-processor puts first (Llama-3), else the config's
    bos_token when it sets add_bos_token, else None (SmolLM2: pre-trained without a BOS).
    eos_id: the config's eos_token, else the first of the usual end pieces that exists.
    pad_id: the config's pad_token, else eos_id.
    """

    def __init__(self, core: _HFCore, config: dict | None = None, source: str = "tokenizer.json"):
        self._tok = core
        config = config or {}

        def config_id(key: str) -> int | None:
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return None if tok is None else core.token_to_id(tok)

        with_special = core.encode("a", add_special_tokens=True).ids
        plain = core.encode("a", add_special_tokens=False).ids
        if len(with_special) > len(plain) and with_special[1:1 + len(plain)] == plain:
            self.bos_id = with_special[0]
        else:
            self.bos_id = config_id("bos_token") if config.get("add_bos_token") else None
        eos = config_id("eos_token")
        if eos is None:
            eos = next((core.token_to_id(t) for t in _EOS_GUESSES if core.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{source}: cannot tell the end-of-sequence token; "
                             f"name it as eos_token in a {CONFIG_FILE} beside it")
        self.eos_id = eos
        pad = config_id("pad_token")
        self.pad_id = eos if pad is None else pad

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = Path(path)
        cfg_path = path.parent / CONFIG_FILE
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        return cls(_HFCore.from_file(str(path)), config, str(path))

    def __len__(self) -> int:
        added = self._tok.get_added_tokens_decoder()
        return max([self._tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        new = [t for t in dict.fromkeys(tokens) if self.token_id(t) is None]
        if new:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return [self.token_id(t) for t in tokens]

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        added = {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}
        config = self._hf_config("PreTrainedTokenizerFast", added)
        return self._write(out_dir, force, HF_FILE, self._tok.to_str().encode(), config)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A directory holding tokenizer.model (preferred) or tokenizer.json, or either file."""
    path = Path(path)
    if path.is_dir():
        for name in (SP_FILE, HF_FILE):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"no tokenizer in {path}: expected {SP_FILE} or {HF_FILE} there")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.suffix == ".model":
        return _with_chat_template(SentencePieceTokenizer.from_file(path), path.parent)
    if path.suffix == ".json":
        return _with_chat_template(HFTokenizer.from_file(path), path.parent)
    raise ValueError(f"{path}: not a tokenizer file (expected a {SP_FILE} or {HF_FILE})")


def _with_chat_template(tok: Tokenizer, folder: Path) -> Tokenizer:
    """Attaches the chat template beside the tokenizer: chat_template.jinja, else
    tokenizer_config.json's chat_template (a string, or a list of named ones: "default")."""
    cfg_path = folder / CONFIG_FILE
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    text = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
    tok.special_text = {k: text(config[k]) for k in ("bos_token", "eos_token", "unk_token",
                                                     "pad_token") if text(config.get(k))}
    jinja = folder / "chat_template.jinja"
    source, origin = config.get("chat_template"), str(cfg_path)
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if jinja.is_file():
        source, origin = jinja.read_text(encoding="utf-8"), str(jinja)
    if isinstance(source, str) and source:
        tok.chat_template, tok.chat_template_origin = source, origin
    return tok


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                        seed: int = 0) -> SentencePieceTokenizer:
    """Trains a Llama-2 style BPE (byte fallback, digits split, no normalisation) and saves it
    to out_dir. Ids: unk=0 bos=1 eos=2 pad=3. The same texts and seed give the same model."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    tok = SentencePieceTokenizer(model.getvalue())
    tok.save(out_dir)
    return tok
