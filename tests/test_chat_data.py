"""Conversation data end to end: the readers (JSONL, JSON, Parquet, save_to_disk), bad input,
over-long conversations, packing that keeps conversations apart, audit, and generate/eval with
the model's own template."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import chat_templates as ct
from jaxft import audit, batches, chat, data
from jaxft.__main__ import main
from jaxft.config import load_config
from jaxft.model import Llama
from jaxft.modeldir import save_model
from jaxft.tasks import DataError, read_records
from jaxft.templates import TemplateError
from jaxft.tokenizer import load_tokenizer
from test_chat import smol_dir  # noqa: F401  (fixture)


def conversation(i: int, turns: int = 2, system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": f"Persona {i}."}] if system else []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"Question {t} of chat {i}: what is {i} + {t}?"},
                 {"role": "assistant", "content": f"{i} + {t} = {i + t}."}]
    return msgs


def sharegpt(msgs):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in msgs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(smol_dir):  # noqa: F811
    return load_tokenizer(smol_dir)


def test_every_file_shape_reads_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = [conversation(i, turns=1 + i % 3, system=i % 2 == 0) for i in range(6)]
    openai = [{"messages": m, "tools": [{"name": "calc"}], "id": i} for i, m in enumerate(convs)]
    files = {"jsonl": write_jsonl(tmp_path / "a.jsonl", openai),
             "sharegpt": write_jsonl(tmp_path / "b.jsonl", [{"conversations": sharegpt(m), "tools": [{"name": "calc"}], "id": i}
                                                            for i, m in enumerate(convs)]),
             "json": tmp_path / "c.json", "parquet": tmp_path / "d.parquet", "hf": tmp_path / "e"}
    files["json"].write_text(json.dumps(openai))
    pq.write_table(pa.Table.from_pylist(openai), files["parquet"])
    datasets.Dataset.from_list(openai).save_to_disk(str(files["hf"]))
    for name, path in files.items():
        recs, skipped = read_records("chat", path)
        assert skipped == 0 and len(recs) == 6, name
        for r, m, i in zip(recs, convs, range(6)):
            assert r["messages"] == m, name
            assert r["extra"] == {"tools": [{"name": "calc"}], "id": i}, name
            assert r["output"] == m[-1]["content"]
    with pytest.raises(DataError, match="'conversations' must be a list"):
        read_records("chat", files["jsonl"], chat_format="sharegpt")


BAD = {
    "not-json": ('{"messages": []}\n{"messages": [oops]}\n', r"bad\.jsonl:2: malformed JSON"),
    "not-a-list": ('{"messages": {"role": "user"}}\n', r"bad\.jsonl:1: 'messages' must be a list"),
    "no-content": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n',
                   r"bad\.jsonl:1: messages\[1\] has no 'content'"),
    "no-shape": ('{"text": "hello"}\n', r"bad\.jsonl:1: expected a 'messages' .* or 'conversations'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_are_one_line_errors(tmp_path, case):
    text, match = BAD[case]
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(DataError, match=match):
        read_records("chat", tmp_path / "bad.jsonl")


def test_empty_and_assistantless_conversations_are_counted_skips(tmp_path):
    rows = [{"messages": []}, {"messages": conversation(0)[:2]}, {"messages": conversation(1)}]
    recs, skipped = read_records("chat", write_jsonl(tmp_path / "s.jsonl", rows))
    assert (len(recs), skipped, recs[0]["line"]) == (1, 2, 3)
    with pytest.raises(DataError, match="no usable conversations .2 without"):
        read_records("chat", write_jsonl(tmp_path / "e.jsonl", rows[:2]))


def config(tmp_path, tok_dir, train, **data_keys):
    cfg = {"data": {"task": "chat", "train_file": str(train), "valid_file": str(train),
                    "template": "tokenizer", "tokenizer": str(tok_dir), "max_length": 128,
                    "batch_size": 2, "padding": "pack", **data_keys}}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_role_the_template_rejects_names_template_and_record(tmp_path, smol_dir, tok):  # noqa: F811
    (tmp_path / "mistral.jinja").write_text(ct.plain("mistral"))
    bad = [{"messages": [{"role": "tool", "content": "x"}] + conversation(0, system=False)}]
    cfg = load_config(config(tmp_path, smol_dir, write_jsonl(tmp_path / "t.jsonl", bad),
                             chat_template=str(tmp_path / "mistral.jinja")))
    recs, _ = data.load_split(cfg, "train")
    t = data.build_tokenizer(cfg, recs)
    with pytest.raises(TemplateError, match=r"mistral\.jinja:\d+: Conversation roles must "
                                            r"alternate.*t\.jsonl:1"):
        batches.make_loader(cfg, t, recs, train=True, process_index=0, process_count=1)


def test_overlong_conversations_lose_whole_turns_or_are_dropped(tmp_path, tok):
    template = chat.get_template("tokenizer", tok=tok)
    long_reply = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "word " * 200}]}
    recs = [{"messages": conversation(i, turns=4)} for i in range(3)] + [long_reply]
    full = template.tokenize(tok, recs[0])
    two = template.tokenize(tok, {"messages": conversation(0, turns=2)})
    d = dataclasses.replace(load_config(None).data, max_length=len(two["ids"]) + 3)
    assert len(full["ids"]) > d.max_length + 1
    examples, stats = data.encode_records(tok, template, recs, d)
    assert (stats.truncated, stats.dropped, stats.examples) == (3, 1, 3)
    np.testing.assert_array_equal(examples[0]["ids"], two["ids"])  # ends after reply 2
    np.testing.assert_array_equal(examples[0]["mask"], two["mask"])
    short = {"messages": conversation(9, turns=1)}
    stats = data.encode_records(tok, template, recs + [short], dataclasses.replace(d, overlong="drop"))[1]
    assert (stats.truncated, stats.dropped, stats.examples) == (0, 4, 1)


def test_packed_conversations_never_attend_to_each_other(tmp_path, smol_dir, tok, tiny_cfg):  # noqa: F811
    rows = [{"messages": conversation(i, turns=1 + i % 2)} for i in range(8)]
    cfg = load_config(config(tmp_path, smol_dir, write_jsonl(tmp_path / "p.jsonl", rows),
                             max_length=256))
    recs, _ = data.load_split(cfg, "train")
    loader = batches.make_loader(cfg, tok, recs, train=False, process_index=0, process_count=1)
    batch = next(iter(loader))
    seg = batch["segment_ids"]
    assert seg.max() >= 3  # several conversations share a row
    model = Llama(dataclasses.replace(tiny_cfg, vocab_size=len(tok), max_seq_len=256), nnx.Rngs(1))
    packed = np.asarray(model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                              jnp.asarray(seg)))
    template = chat.get_template("tokenizer", tok=tok)
    by_ids = {tuple(template.tokenize(tok, r)["ids"][:-1]): template.tokenize(tok, r) for r in recs}
    checked = 0
    for b in range(seg.shape[0]):
        for s in range(1, seg[b].max() + 1):
            at = seg[b] == s
            ids = batch["inputs"][b][at]
            enc = by_ids[tuple(ids)]  # each segment is exactly one whole conversation
            np.testing.assert_array_equal(batch["loss_mask"][b][at], enc["mask"][1:])
            np.testing.assert_array_equal(batch["positions"][b][at], np.arange(len(ids)))
            alone = np.asarray(model(jnp.asarray(ids[None])))[0]
            np.testing.assert_allclose(packed[b][at], alone, atol=2e-4, rtol=0)
            checked += 1
    assert checked >= 4


def test_audit_shows_turns_and_mask(tmp_path, smol_dir, capsys):  # noqa: F811
    rows = [{"conversations": sharegpt(conversation(i))} for i in range(4)]
    path = config(tmp_path, smol_dir, write_jsonl(tmp_path / "a.jsonl", rows))
    assert main(["audit", str(path), "--n", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    turns = [line for line in out if line.startswith("  [")]
    assert [t.split("]")[0] for t in turns] == ["  [system", "  [user", "  [assistant",
                                                "  [user", "  [assistant"]
    assert all(audit.OPEN not in t for t in turns if not t.startswith("  [assistant"))
    assert turns[2].endswith("[[ 0 Ġ+ Ġ 0 Ġ= Ġ 0 . <|im_end|> Ċ ]]")
    assert any(line.startswith("skipped empty:") for line in out)


def test_instruction_records_through_the_tokenizer_template(tok, data_root):
    recs, _ = read_records("viggo", data_root / "viggo" / "valid.csv")
    template = chat.get_template("tokenizer", include_instruction=False, tok=tok)
    enc = template.tokenize(tok, recs[0], "response")
    assert tok.decode(enc["ids"][enc["mask"] == 1]) == recs[0]["output"] + "<|im_end|>\n"
    assert template.conversation(recs[0])[0] == {"role": "user", "content": recs[0]["input"]}
    with_inst = chat.get_template("tokenizer", include_instruction=True, tok=tok)
    assert with_inst.conversation(recs[0])[0]["role"] == "system"


# ---------------------------------------------------------------- generate and eval

@pytest.fixture(scope="module")
def chat_model(tiny_cfg, sp_tokenizer, tmp_path_factory):
    """The chain model of test_generate on a SentencePiece tokenizer given a ChatML template."""
    from test_generate import chain_model
    tok = load_tokenizer(sp_tokenizer.save(tmp_path_factory.mktemp("sp") / "tok"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ct.plain("chatml")
    model, succ = chain_model(tiny_cfg, n_used=len(tok), seed=5)
    return save_model(tmp_path_factory.mktemp("m") / "chat", model, tok), succ, tok


def chain_reply(succ, tok, prompt, stop, n=8):
    ids, t = [], prompt[-1]
    for _ in range(n):
        t = int(succ[t])
        if t in (tok.eos_id, stop):
            break
        ids.append(t)
    return tok.decode(ids, skip_special=True)


def test_generate_chat_and_messages(chat_model, tmp_path, capsys):
    path, succ, tok = chat_model
    template = chat.get_template("tokenizer", tok=load_tokenizer(path / "tokenizer"))
    msgs = conversation(3)[:-1]
    (tmp_path / "m.json").write_text(json.dumps({"messages": msgs}))
    stop = tok.token_id("<|im_end|>")
    for flag, value, messages in (("--chat", "Hello there", [{"role": "user", "content": "Hello there"}]),
                                  ("--messages", str(tmp_path / "m.json"), msgs)):
        assert main(["generate", "--ckpt", str(path), flag, value, "--max-new-tokens", "8"]) == 0
        prompt = template.prompt_ids(tok, {"messages": messages})
        assert prompt[-3:] == tok.encode_offsets("<|im_start|>assistant\n")[0][-3:]
        assert capsys.readouterr().out == chain_reply(succ, tok, prompt, stop) + "\n"


def test_eval_scores_a_chat_file_by_exact_match(chat_model, tmp_path):
    path, succ, tok = chat_model
    template = chat.get_template("tokenizer", tok=load_tokenizer(path / "tokenizer"))
    stop = tok.token_id("<|im_end|>")
    rows = []
    for i in range(4):
        msgs = conversation(i)
        reply = chain_reply(succ, tok, template.prompt_ids(tok, {"messages": msgs}), stop)
        msgs[-1]["content"] = reply if i % 2 == 0 and reply.strip() else "wrong"
        rows.append({"messages": msgs})
    right = sum(r["messages"][-1]["content"] != "wrong" for r in rows)
    assert right >= 1
    out = tmp_path / "ev"
    assert main(["eval", "--ckpt", str(path), "--task", "chat", "--template", "tokenizer",
                 "--data", str(write_jsonl(tmp_path / "v.jsonl", rows)), "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["exact"] == right / 4
