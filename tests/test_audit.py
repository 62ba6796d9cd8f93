"""`jaxft audit` on the real ViGGO file: brackets exactly the trained tokens, fails on a bad
template boundary."""
import argparse

import numpy as np
import pytest
import yaml

from jaxft import audit
from jaxft.tasks import read_records
from jaxft.templates import boundary_ok, get_template, tokenize_example

LIMIT = 60


@pytest.fixture(scope="module")
def tok_dir(sp_tokenizer, tmp_path_factory):
    return sp_tokenizer.save(tmp_path_factory.mktemp("audit") / "tok")


def write_config(tmp_path, data_root, tok_dir, **data):
    data = {"root": str(data_root), "tokenizer": str(tok_dir), "template": "special-tokens",
            "max_length": 320, "padding": "longest", "limit": LIMIT, "batch_size": 4, **data}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def cli(argv):
    parser = argparse.ArgumentParser()
    audit.add_parser(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    return args.func(args)


def parse_example(line):
    """(pieces, trained flags) from a rendered example line."""
    pieces, flags, inside = [], [], False
    for t in line.split(" "):
        if t in (audit.OPEN, audit.CLOSE):
            assert inside == (t == audit.CLOSE), "brackets must alternate"
            inside = t == audit.OPEN
            continue
        pieces.append(t)
        flags.append(int(inside))
    assert not inside
    return pieces, flags


def test_audit_brackets_exactly_the_targets(tmp_path, data_root, tok_dir, capsys):
    from jaxft.tokenizer import load_tokenizer
    cfg = write_config(tmp_path, data_root, tok_dir)
    assert cli([str(cfg), "--n", "3", "--set", "data.train_on=response"]) == 0
    out = capsys.readouterr().out.splitlines()
    tok = load_tokenizer(tok_dir)
    template = get_template("special-tokens", include_instruction=False)
    tok.add_special_tokens(list(template.special_tokens))
    recs, _ = read_records("viggo", data_root / "viggo" / "train.csv")
    starts = [i for i, line in enumerate(out) if line.startswith("--- example")]
    assert len(starts) == 3
    for i, rec in zip(starts, recs):
        pieces, flags = parse_example(out[i + 1])
        ids = tokenize_example(tok, template, rec)["ids"]
        assert pieces == [tok.id_to_piece(int(t)) for t in ids]
        # The trained span is the response and EOS, nothing of the prompt.
        response = tok.encode(template.response(rec)) + [tok.eos_id]
        assert flags == [0] * (len(ids) - len(response)) + [1] * len(response)
    counts = dict(line.split(":", 1) for line in out[starts[-1] + 2:] if ":" in line
                  and not line.startswith("---"))
    targets = sum(len(tok.encode(template.response(r))) + 1 for r in recs[:LIMIT])
    tokens = sum(len(tokenize_example(tok, template, r)["ids"]) - 1 for r in recs[:LIMIT])
    assert int(counts["examples"]) == LIMIT
    assert int(counts["target tokens"]) == targets and int(counts["tokens"]) == tokens
    assert int(counts["truncated"]) == 0 and int(counts["dropped"]) == 0
    assert 0 < float(counts["padding ratio"]) < 1


def test_audit_train_on_all_brackets_everything_but_bos(tmp_path, data_root, tok_dir, capsys):
    cfg = write_config(tmp_path, data_root, tok_dir, train_on="all")
    assert cli([str(cfg), "--n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    starts = [i for i, line in enumerate(out) if line.startswith("--- example")]
    for i in starts:
        _, flags = parse_example(out[i + 1])
        assert flags == [0] + [1] * (len(flags) - 1)


def test_audit_fails_loudly_on_a_bad_boundary(tmp_path, data_root, tok_dir, capsys):
    from jaxft.tokenizer import load_tokenizer
    # A prompt ending in a space: alone it encodes to a trailing lone "▁" token that
    # prompt + response never contains.
    tpl = tmp_path / "spaced.yaml"
    tpl.write_text(yaml.safe_dump({"prompt": "Sentence: {input}\nMeaning: ",
                                   "response": "{output}"}))
    recs, _ = read_records("viggo", data_root / "viggo" / "train.csv")
    assert not boundary_ok(load_tokenizer(tok_dir), get_template(str(tpl)), recs[0])
    cfg = write_config(tmp_path, data_root, tok_dir, template=str(tpl))
    assert cli([str(cfg), "--n", "2"]) == 1
    captured = capsys.readouterr()
    assert "TEMPLATE BOUNDARY ERROR" in captured.err and "spaced.yaml" in captured.err
    assert captured.out.count("--- example") == 2  # the examples are still shown


def test_render_marks_runs(sp_tokenizer):
    ids = [5, 6, 7, 8, 9, 10]
    p = [sp_tokenizer.id_to_piece(i) for i in ids]
    text = audit.render(sp_tokenizer, ids, [0, 1, 1, 0, 1, 1])
    assert text == f"{p[0]} [[ {p[1]} {p[2]} ]] {p[3]} [[ {p[4]} {p[5]} ]]"
    coloured = audit.render(sp_tokenizer, ids[:2], [0, 1], colour=True)
    assert coloured == f"{p[0]} [[ {audit.GREEN}{p[1]}{audit.RESET} ]]"
