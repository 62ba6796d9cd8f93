"""jaxft.chat against transformers' apply_chat_template on the real SmolLM2 tokenizer: its own
template (from the GGUF) and five public layouts set on it, multi-turn, with and without a
system prompt. ids, the assistant mask (terminator included) and the generation prompt."""
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import smollm2_gguf
import transformers

import chat_templates as ct
from jaxft import chat
from jaxft.gguf import tokenizer_files
from jaxft.templates import TemplateError, tokenize_example
from jaxft.tokenizer import load_tokenizer

SYSTEM = [{"role": "system", "content": "You answer in one short sentence."}]
# The second reply repeats text from its prompt: a mask found by searching would trip on it.
TURNS = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."},
         {"role": "user", "content": "Say: the capital of France is Paris."},
         {"role": "assistant", "content": "the capital of France is Paris."},
         {"role": "user", "content": "Und auf Deutsch? café ☕"},
         {"role": "assistant", "content": "Die Hauptstadt ist Paris ☕."}]
CONVERSATIONS = {"no-system": TURNS, "system": SYSTEM + TURNS}
# Llama-2 and Mistral close a reply with eos_token: SmolLM2's is <|im_end|>.
TERMINATOR = {"llama3": "<|eot_id|>", "llama2": "<|im_end|>", "mistral": "<|im_end|>",
              "qwen2.5": "<|im_end|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>"}


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """SmolLM2's tokenizer.json + tokenizer_config.json (with its chat template), from the GGUF."""
    path, out = smollm2_gguf(), tmp_path_factory.mktemp("smol-tok")
    for name, text in tokenizer_files(gguf.GGUFReader(str(path)), path).items():
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def toks(smol_dir):
    return load_tokenizer(smol_dir), transformers.AutoTokenizer.from_pretrained(str(smol_dir))


def bound(tok, source: str) -> chat.ChatTemplate:
    return chat.ChatTemplate(source, "test.jinja", chat.template_tokens(tok))


def hf_ids(hf, messages, source=None, **kw):
    return list(hf.apply_chat_template(messages, chat_template=source, tokenize=True,
                                       return_dict=False, **kw))


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_smollm2_own_template_matches_transformers(toks, smol_dir, conv):
    tok, hf = toks
    messages = CONVERSATIONS[conv]
    # transformers' own GGUF reader gives the same template and ids as the converted dir.
    path = smollm2_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ref.chat_template == tok.chat_template == hf.chat_template
    template = chat.get_template("tokenizer", tok=tok)
    enc = template.tokenize(tok, {"messages": messages})
    assert list(enc["ids"]) == hf_ids(ref, messages) == hf_ids(hf, messages)
    want = hf.apply_chat_template(messages, chat_template=ct.marked("chatml"), tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert list(want["input_ids"]) == list(enc["ids"])  # the marked twin renders the same text
    assert list(enc["mask"]) == list(want["assistant_masks"])
    prompt = template.prompt_ids(tok, {"messages": messages})
    assert prompt == hf_ids(ref, messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("layout", sorted(ct.LAYOUTS))
def test_layout_ids_masks_and_prompt_match_transformers(toks, layout, conv):
    tok, hf = toks
    messages = CONVERSATIONS[conv]
    plain, marked = bound(tok, ct.plain(layout)), bound(tok, ct.marked(layout))
    by_turns = plain.tokenize(tok, {"messages": messages})
    by_marks = marked.tokenize(tok, {"messages": messages})
    want = hf.apply_chat_template(messages, chat_template=ct.marked(layout), tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    # ids: both twins, as transformers tokenises them
    assert list(by_turns["ids"]) == hf_ids(hf, messages, ct.plain(layout)) == list(want["input_ids"])
    assert list(by_marks["ids"]) == list(want["input_ids"])
    # mask: generation blocks give transformers' mask; turn-by-turn rendering gives the same
    assert list(by_marks["mask"]) == list(want["assistant_masks"])
    assert list(by_turns["mask"]) == list(want["assistant_masks"])
    # every reply is trained with its terminator; system and user text never
    targets = tok.decode(by_turns["ids"][by_turns["mask"] == 1])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert targets.count(TERMINATOR[layout]) == len(replies)
    assert all(r in targets for r in replies) and "capital of France?" not in targets
    assert "one short sentence" not in targets
    assert targets.rstrip("\n").endswith(TERMINATOR[layout])  # the final turn's end is a target
    # the generation prompt
    ex = {"messages": messages}
    assert plain.prompt_ids(tok, ex) == hf_ids(hf, messages[:-1], ct.plain(layout),
                                               add_generation_prompt=True)
    assert plain.stops() == (TERMINATOR[layout],)


def test_last_assistant_and_all(toks):
    tok, _ = toks
    template = bound(tok, ct.plain("llama3"))
    ex = {"messages": SYSTEM + TURNS}
    every = template.tokenize(tok, ex, "assistant")["mask"]
    last = template.tokenize(tok, ex, "last_assistant")["mask"]
    assert last.sum() < every.sum() and (last <= every).all()
    targets = tok.decode(template.tokenize(tok, ex, "all")["ids"][last == 1])
    assert targets == TURNS[-1]["content"] + "<|eot_id|>"
    assert template.tokenize(tok, ex, "all")["mask"].all()
    # the data pipeline's entry point hands chat templates to chat.py
    np.testing.assert_array_equal(tokenize_example(tok, template, ex, "last_assistant")["mask"], last)


def test_extra_keys_reach_the_template(toks):
    tok, hf = toks
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object"}}}]
    template = bound(tok, ct.plain("qwen2.5"))
    ex = {"messages": TURNS[:2], "extra": {"tools": tools}}
    enc = template.tokenize(tok, ex)
    assert list(enc["ids"]) == hf_ids(hf, TURNS[:2], ct.plain("qwen2.5"), tools=tools)
    assert '"météo"' in tok.decode(enc["ids"])  # tojson keeps non-ASCII text


def test_sandbox_helpers_behave_as_in_transformers(toks):
    tok, hf = toks
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{% endfor %}{{ ns.n }} {{ strftime_now('%Y') | length }} {{ dict(a=1) | tojson }}"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
              "{{ m.content }}{% endfor %}")
    text = bound(tok, source).render(TURNS)[0]
    assert text == hf.apply_chat_template(TURNS, chat_template=source, tokenize=False)
    assert text.startswith("6 4 {\"a\": 1}What")
    with pytest.raises(TemplateError, match="test.jinja"):
        bound(tok, "{% set ns = namespace() %}{% set ns._x = 1 %}").render(TURNS)
    with pytest.raises(TemplateError, match="test.jinja"):
        bound(tok, "{{ messages.__class__.__mro__ }}").render(TURNS)


def test_template_errors_name_the_template_line_and_the_record(toks):
    tok, _ = toks
    bad = bound(tok, "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError, match=r"test\.jinja:2: chat template syntax error"):
        bad.tokenize(tok, {"messages": TURNS, "file": "d.jsonl", "line": 7})
    mistral = bound(tok, ct.plain("mistral"))
    ex = {"messages": [{"role": "tool", "content": "x"}] + TURNS, "file": "d.jsonl", "line": 3}
    with pytest.raises(TemplateError, match=r"test\.jinja:\d+: Conversation roles must alternate.*d\.jsonl:3"):
        mistral.tokenize(tok, ex)


def test_a_template_whose_prefix_changes_needs_generation_marks(toks):
    tok, _ = toks
    # Renders earlier replies differently once a later turn exists (as reasoning templates do).
    source = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and not loop.last %}"
              "[old]{% endif %}{{ m.content }}\n{% endfor %}")
    with pytest.raises(TemplateError, match="generation"):
        bound(tok, source).tokenize(tok, {"messages": TURNS})


def test_tokenizer_keeps_its_chat_template_when_saved(toks, tmp_path):
    tok, _ = toks
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again.chat_template == tok.chat_template
    for key in ("bos_token", "eos_token"):
        assert chat.template_tokens(again)[key] == chat.template_tokens(tok)[key]
    (tmp_path / "t" / "chat_template.jinja").write_text(ct.plain("gemma"))
    assert load_tokenizer(tmp_path / "t").chat_template == ct.plain("gemma")
