"""Templates and the tokenize-and-mask transform, checked against hand-written texts and HF's
tokenizer (an independent implementation of the same SentencePiece model) for expected ids."""
import json

import numpy as np
import pytest

from jaxft.templates import TemplateError, boundary_ok, get_template, prompt_ids, tokenize_example
from jaxft.tokenizer import load_tokenizer

ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n")
EX = {"instruction": "Describe the game.", "input": "name[Tetris], rating[good]", "output": "Tetris is good."}
NO_INPUT = {"instruction": "Name a game.", "input": "", "output": "Tetris."}
NO_INSTRUCTION = {"instruction": "", "input": "name[Tetris]", "output": "Tetris."}


@pytest.fixture(scope="module")
def tok_dir(sp_tokenizer, tmp_path_factory):
    """The session SentencePiece model plus the seed's markers, saved (the fixture stays untouched)."""
    d = tmp_path_factory.mktemp("tok")
    sp_tokenizer.save(d / "orig")
    tok = load_tokenizer(d / "orig")
    tok.add_special_tokens(get_template("special-tokens").special_tokens)
    return tok.save(d / "with_markers")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


def test_alpaca_is_ch07_text(data_root):
    records = json.loads((data_root / "instruct-ch07" / "instruction-data.json").read_text())[:3]
    t = get_template("alpaca")
    assert records[0]["input"] and not records[2]["input"]  # both branches below
    for r in records:
        # ch07: format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        text = ALPACA_HEAD + r["instruction"] + (f"\n\n### Input:\n{r['input']}" if r["input"] else "")
        assert t.prompt(r) + t.response(r) == text + "\n\n### Response:\n" + r["output"]
        assert t.response(r) == r["output"] and t.special_tokens == ()


@pytest.mark.parametrize("name,include,ex,prompt,response", [
    ("alpaca", True, NO_INPUT, ALPACA_HEAD + "Name a game.\n\n### Response:\n", "Tetris."),
    ("alpaca", False, EX, ALPACA_HEAD + "Describe the game.\n\n### Input:\nname[Tetris], rating[good]"
     "\n\n### Response:\n", "Tetris is good."),
    ("phi3", True, EX, "<|user|>\nDescribe the game.\nname[Tetris], rating[good]\n<|assistant|>\n",
     "Tetris is good."),
    ("phi3", True, NO_INPUT, "<|user|>\nName a game.\n<|assistant|>\n", "Tetris."),
    ("special-tokens", True, EX, "<START_Q>Describe the game.\nname[Tetris], rating[good]<END_Q><START_A>",
     "Tetris is good.<END_A>"),
    ("special-tokens", False, EX, "<START_Q>name[Tetris], rating[good]<END_Q><START_A>",
     "Tetris is good.<END_A>"),
    ("special-tokens", True, NO_INSTRUCTION, "<START_Q>name[Tetris]<END_Q><START_A>", "Tetris.<END_A>"),
    ("special-tokens", False, NO_INPUT, "<START_Q>Name a game.<END_Q><START_A>", "Tetris.<END_A>"),
    ("llama2-chat", True, EX, "[INST] <<SYS>>\nDescribe the game.\n<</SYS>>\n\nname[Tetris], rating[good] "
     "[/INST]", "Tetris is good."),
    ("llama2-chat", False, EX, "[INST] name[Tetris], rating[good] [/INST]", "Tetris is good."),
    ("llama2-chat", True, NO_INPUT, "[INST] Name a game. [/INST]", "Tetris."),
    ("chatml", True, EX, "<|im_start|>system\nDescribe the game.<|im_end|>\n<|im_start|>user\n"
     "name[Tetris], rating[good]<|im_end|>\n<|im_start|>assistant\n", "Tetris is good."),
    ("chatml", False, EX, "<|im_start|>user\nname[Tetris], rating[good]<|im_end|>\n"
     "<|im_start|>assistant\n", "Tetris is good."),
])
def test_builtin_texts(name, include, ex, prompt, response):
    t = get_template(name, include_instruction=include)
    assert (t.prompt(ex), t.response(ex)) == (prompt, response)


def test_special_tokens_ids_and_mask(tok, hf):
    t = get_template("special-tokens", include_instruction=False)
    out = tokenize_example(tok, t, EX)
    ids, mask = out["ids"].tolist(), out["mask"].tolist()
    assert out["ids"].dtype == out["mask"].dtype == np.int32
    q, eq, a, ea = (tok.token_id(m) for m in ("<START_Q>", "<END_Q>", "<START_A>", "<END_A>"))
    p = hf.encode("<START_Q>name[Tetris], rating[good]<END_Q><START_A>", add_special_tokens=False)
    r = hf.encode("Tetris is good.<END_A>", add_special_tokens=False)
    assert p[0] == q and p[-2:] == [eq, a] and r[-1] == ea and len(r) > 1  # markers whole
    assert ids == [1] + p + r + [2]
    assert mask == [0] * (len(p) + 1) + [1] * (len(r) + 1)
    assert mask[ids.index(a)] == 0 and mask[ids.index(a) + 1] == 1 and mask[-1] == 1
    assert tok.decode(np.asarray(ids)[np.asarray(mask) == 1]) == "Tetris is good.<END_A></s>"


@pytest.mark.parametrize("name", ["alpaca", "phi3", "llama2-chat"])
def test_text_templates_ids_and_mask(tok, hf, name):
    t = get_template(name)
    prompt, response = t.prompt(EX), t.response(EX)  # texts checked in test_builtin_texts
    p = hf.encode(prompt, add_special_tokens=False)
    r = hf.encode(response, add_special_tokens=False)
    out = tokenize_example(tok, t, EX)
    assert out["ids"].tolist() == [tok.bos_id] + p + r + [tok.eos_id]
    assert out["mask"].tolist() == [0] * (1 + len(p)) + [1] * (len(r) + 1)
    assert boundary_ok(tok, t, EX)


def test_train_on_all_masks_only_bos(tok):
    t = get_template("special-tokens")
    resp, full = (tokenize_example(tok, t, EX, train_on=k) for k in ("response", "all"))
    assert np.array_equal(resp["ids"], full["ids"])
    assert full["mask"].tolist() == [0] + [1] * (len(full["ids"]) - 1)
    assert resp["mask"].sum() < full["mask"].sum()
    with pytest.raises(ValueError, match="train_on"):
        tokenize_example(tok, t, EX, train_on="prompt")


def test_prompt_ids_are_the_training_prefix(tok):
    t = get_template("special-tokens")
    head = prompt_ids(tok, t, EX)
    out = tokenize_example(tok, t, EX)
    assert out["ids"][:len(head)].tolist() == head and head[0] == tok.bos_id
    assert out["mask"][:len(head)].sum() == 0 and out["mask"][len(head):].all()
    assert tok.decode(out["ids"][len(head):-1]) == t.response(EX)


def test_byte_level_tokenizer_without_bos(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([EX["output"], EX["input"]] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None
    t = get_template("alpaca")
    out = tokenize_example(tok, t, EX, train_on="all")
    assert out["ids"].tolist() == core.encode(t.prompt(EX)).ids + core.encode(t.response(EX)).ids + [0]
    assert out["mask"].all()  # no BOS, so every id is a target when training on all
    assert prompt_ids(tok, t, EX) == core.encode(t.prompt(EX)).ids


def test_template_tokens_must_be_added_first(data_root, tmp_path):
    from jaxft.tokenizer import train_sentencepiece
    refs = [line for line in (data_root / "viggo" / "valid.csv").read_text().splitlines()]
    bare = train_sentencepiece(refs, vocab_size=400, out_dir=tmp_path)
    with pytest.raises(TemplateError, match=r"lacks \['<START_Q>'.*add_special_tokens"):
        tokenize_example(bare, get_template("special-tokens"), EX)


def test_boundary_ok_flags_a_prompt_ending_in_a_space(tok, tmp_path):
    (tmp_path / "t.yaml").write_text('prompt: "Q: {input} A: "\nresponse: "{output}"\n')
    spaced = get_template(str(tmp_path / "t.yaml"))
    assert not boundary_ok(tok, spaced, EX)
    (tmp_path / "u.yaml").write_text('prompt: "Q: {input} A:"\nresponse: " {output}"\n')
    assert boundary_ok(tok, get_template(str(tmp_path / "u.yaml")), EX)


def test_yaml_template(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text('prompt: "<Q>{instruction}|{input}</Q>"\nprompt_no_input: "<Q>{instruction}</Q>"\n'
                    'response: "{output}</A>"\nspecial_tokens: ["<Q>", "</Q>", "</A>"]\n')
    t = get_template(str(path))
    assert t.special_tokens == ("<Q>", "</Q>", "</A>")
    assert t.prompt(EX) == "<Q>Describe the game.|name[Tetris], rating[good]</Q>"
    assert t.prompt(NO_INPUT) == "<Q>Name a game.</Q>" and t.response(NO_INPUT) == "Tetris.</A>"


@pytest.mark.parametrize("text,match", [
    ('prompt: "{input}"\nresponse: "{output}"\nsystem: "x"\n', r"unknown key\(s\) system; valid keys: prompt, "),
    ('prompt: "{question}"\nresponse: "{output}"\n', r"prompt uses \{question\}; fields are instruction"),
    ('response: "{output}"\n', "missing key 'prompt'"),
    ('prompt: "{input"\nresponse: "{output}"\n', "prompt: .*literal braces"),
    ('prompt: "{input}"\nresponse: "{output}"\nspecial_tokens: "<Q>"\n', "special_tokens must be a list"),
    ('- a\n- b\n', "expected a mapping"),
    ('prompt: [\n', "not valid YAML"),
])
def test_yaml_template_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError, match=match) as e:
        get_template(str(path))
    assert str(path) in str(e.value)


def test_missing_record_field_is_named():
    t = get_template("special-tokens")
    with pytest.raises(TemplateError, match="no field 'output'"):
        t.response({"instruction": "", "input": "x"})
    with pytest.raises(TemplateError, match="no field 'input'"):
        get_template("alpaca").prompt({"instruction": "x", "output": "y", "inputs": "z"})
    with pytest.raises(TemplateError, match="record at line 7 has no field 'input'"):
        t.prompt({"instruction": "x", "output": "y", "line": 7})


def test_unknown_template_names_the_choices(tmp_path):
    with pytest.raises(TemplateError, match="unknown template 'vicuna'.*alpaca, phi3"):
        get_template("vicuna")
    with pytest.raises(TemplateError, match="does not exist"):
        get_template(str(tmp_path / "none.yaml"))
