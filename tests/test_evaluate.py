"""Evaluation: scoring known predictions, end to end with a model whose outputs are known,
few-shot prompts, output files, and the eval/generate CLIs."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxft.__main__ import main
from jaxft.errors import ConfigError
from jaxft.evaluate import (TaskEvaluator, few_shot_ids, intervals, run_eval, score_predictions,
                            wilson, write_results)
from jaxft.generate import cut_at_stop
from jaxft.modeldir import OutputExistsError, save_model
from jaxft.tasks import STOPS
from jaxft.templates import get_template, prompt_ids
from test_generate import chain_model

VIGGO = [
    {"instruction": "", "input": "Tetris is good.", "output": "inform(name[Tetris], rating[good])", "line": 2},
    {"instruction": "", "input": "Do you like Doom?", "output": "request(name[Doom], genres[shooter, action])", "line": 3},
    {"instruction": "", "input": "x", "output": "inform(name[Myst])", "line": 4},
    {"instruction": "", "input": "y", "output": "confirm(name[Portal], esrb[E])", "line": 5},
]
PREDS = [
    "inform(name[Tetris], rating[good])",  # identical
    "request(genres[action, shooter], name[Doom])",  # same content, other order: exact, not strict
    "inform(name[Riven])",  # wrong value
    "confirm(name[portal], esrb[E])<END_A>junk after the end marker",  # value case ignored
]


def test_wilson_intervals_and_the_judge_interval():
    # reference values of the Wilson score interval (z = 1.96)
    assert wilson(3, 200) == pytest.approx([0.00512, 0.04313], abs=5e-5)
    assert wilson(0, 50) == pytest.approx([0.0, 0.07135], abs=5e-5)  # never below 0
    assert wilson(50, 50) == pytest.approx([0.92865, 1.0], abs=5e-5)
    rows, metrics = score_predictions("viggo", VIGGO, PREDS)
    ci = intervals(rows, metrics)
    assert set(ci) == {"exact", "strict"} and ci["exact"] == wilson(3, 4)
    for r, s in zip(rows, (10, 20, 30, None)):
        r["judge_score"] = s
    lo, hi = intervals(rows, metrics)["judge_mean"]
    assert (lo + hi) / 2 == pytest.approx(20) and hi - lo == pytest.approx(2 * 1.96 * 10 / 3 ** 0.5)


def test_score_and_write_known_predictions(tmp_path):
    rows, metrics = score_predictions("viggo", VIGGO, PREDS)
    assert metrics == {"n": 4, "exact": 0.75, "strict": 0.5}
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert rows[3]["prediction"] == "confirm(name[portal], esrb[E])"
    out = tmp_path / "ev"
    write_results(out, rows, metrics)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["line"] for x in lines] == [2, 3, 4, 5]
    assert lines[1] == {**rows[1], "strict": False, "exact": True}
    assert json.loads((out / "metrics.json").read_text())["exact"] == 0.75
    with pytest.raises(OutputExistsError, match="--force"):
        write_results(out, rows[:1], metrics)
    write_results(out, rows[:1], {"n": 1}, force=True)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------- a model with known outputs

MAX_NEW = 8
TEMPLATE_YAML = 'prompt: "Q: {instruction} {input}"\nprompt_no_input: "Q: {instruction}"\nresponse: "{output}"\n'


@pytest.fixture(scope="module")
def setup(tiny_cfg, sp_tokenizer, tmp_path_factory):
    """The chain model (next token = succ[last token]), a real SentencePiece tokenizer and a
    template whose prompt ends in the record's own last token, so answers differ by record."""
    tok = sp_tokenizer
    model, succ = chain_model(tiny_cfg, n_used=len(tok), seed=3)
    path = tmp_path_factory.mktemp("tpl") / "plain.yaml"
    path.write_text(TEMPLATE_YAML)
    return model, succ, tok, get_template(str(path))


def expected_text(succ, tok, prompt: list[int]) -> str:
    """What the chain model must write: successors of the last prompt token, up to EOS or a
    one-token stop marker, decoded and cut at the first stop string."""
    stops = {tok.eos_id} | {i for i in map(tok.token_id, STOPS) if i is not None}
    ids, t = [], prompt[-1]
    for _ in range(MAX_NEW):
        t = int(succ[t])
        if t in stops:
            break
        ids.append(t)
    return cut_at_stop(tok.decode(ids), STOPS)


def instruct_records(setup, n=6):
    model, succ, tok, template = setup
    recs = [{"instruction": f"Tell me about game {i}", "input": "" if i % 2 else f"level {i + 3}",
             "output": "", "line": i} for i in range(n)]
    for i, r in enumerate(recs):  # even records get their true output as gold, odd a wrong one
        want = expected_text(succ, tok, prompt_ids(tok, template, r))
        r["output"] = want if i % 2 == 0 and want.strip() else "not what it says"
    return recs


def test_run_eval_accuracy_of_known_model(setup, tmp_path):
    model, succ, tok, template = setup
    recs = instruct_records(setup)
    n_right = sum(r["output"] != "not what it says" for r in recs)
    assert n_right >= 2  # the construction gives some non-empty answers
    assert len({r["output"] for r in recs}) >= 3  # and different ones
    out = tmp_path / "ev"
    metrics = run_eval(model, tok, template, "instruct", recs, limit=0, max_new_tokens=MAX_NEW,
                       batch_size=4, out_dir=out)
    assert metrics == {"n": 6, "exact": n_right / 6, "shots": 0,
                       "ci95": {"exact": wilson(n_right, 6)}}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for r, row in zip(recs, rows):
        assert row["raw"] == expected_text(succ, tok, prompt_ids(tok, template, r))
        assert row["prompt"] == template.prompt(r) and row["gold"] == r["output"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with pytest.raises(OutputExistsError):
        run_eval(model, tok, template, "instruct", recs, max_new_tokens=MAX_NEW, out_dir=out)
    assert run_eval(model, tok, template, "instruct", recs, limit=2, max_new_tokens=MAX_NEW,
                    out_dir=out, force=True)["n"] == 2

    evaluator = TaskEvaluator(tok, template, "instruct", recs, n=4, max_new_tokens=MAX_NEW, batch_size=4)
    assert evaluator.run(model) == {"instruct_exact": sum(r["output"] != "not what it says"
                                                          for r in recs[:4]) / 4}


def test_few_shot_prompt(setup):
    model, succ, tok, template = setup
    shots = [{"instruction": "Name a fruit.", "input": "", "output": "Apple."},
             {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    query = {"instruction": "Name a game.", "input": "", "output": ""}
    ids = few_shot_ids(tok, template, shots, query)
    head = prompt_ids(tok, template, query)
    first = (tok.encode(template.prompt(shots[0])) + tok.encode("Apple.") + [tok.eos_id]
             + tok.encode("\n\n"))
    assert ids[0] == tok.bos_id and ids[1:1 + len(first)] == first
    assert ids[-(len(head) - 1):] == head[1:]
    text = tok.decode(ids[1:], skip_special=True)
    assert text.index("Apple.") < text.index("Name a colour.") < text.index("Blue.") < text.index("Name a game.")
    # The model's answer continues the query prompt, so few-shot generation ends like zero-shot.
    recs = [dict(query, output="x", line=0)]
    m = run_eval(model, tok, template, "instruct", recs, shots=2, shot_records=shots,
                 max_new_tokens=MAX_NEW)
    assert m["shots"] == 2
    with pytest.raises(ValueError, match="needs 3 training examples"):
        run_eval(model, tok, template, "instruct", recs, shots=3, shot_records=shots)


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def model_dir(setup, tmp_path_factory):
    model, succ, tok, template = setup
    return save_model(tmp_path_factory.mktemp("m") / "chain", model, tok)


def test_cli_eval(setup, model_dir, tmp_path, capsys):
    model, succ, tok, template = setup
    recs = instruct_records(setup, n=4)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in recs]))
    out = tmp_path / "ev"
    (tmp_path / "plain.yaml").write_text(TEMPLATE_YAML)
    argv = ["eval", "--ckpt", str(model_dir), "--task", "instruct", "--data", str(data),
            "--template", str(tmp_path / "plain.yaml"), "--max-new-tokens", str(MAX_NEW), "--out", str(out)]
    assert main(argv) == 0
    want = sum(r["output"] != "not what it says" for r in recs) / 4
    assert json.loads((out / "metrics.json").read_text())["exact"] == want
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    data.write_text('[{"instruction": "a", "output": "b"}]')
    assert main(argv[:-2]) == 2
    assert "missing field 'input'" in capsys.readouterr().err


def test_cli_generate(setup, model_dir, capsys):
    model, succ, tok, template = setup
    argv = ["generate", "--ckpt", str(model_dir), "--prompt", "Name a game.", "--template", "alpaca",
            "--max-new-tokens", str(MAX_NEW)]
    assert main(argv) == 0
    ids = prompt_ids(tok, get_template("alpaca"), {"instruction": "Name a game.", "input": "", "output": ""})
    want, t = [], ids[-1]
    for _ in range(MAX_NEW):
        t = int(succ[t])
        if t == tok.eos_id:
            break
        want.append(t)
    assert capsys.readouterr().out == tok.decode(want, skip_special=True) + "\n"


class _NoScoreJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that never gives a score."""
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        payload = json.dumps({"choices": [{"index": 0, "message": {
            "role": "assistant", "content": "I would rather not grade this."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_eval_whose_judge_scored_nothing_fails_unless_allowed(setup, model_dir, tmp_path, capsys):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _NoScoreJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        recs = instruct_records(setup, n=2)
        data = tmp_path / "data.json"
        data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in recs]))
        (tmp_path / "plain.yaml").write_text(TEMPLATE_YAML)
        argv = ["eval", "--ckpt", str(model_dir), "--task", "instruct", "--data", str(data),
                "--template", str(tmp_path / "plain.yaml"), "--max-new-tokens", str(MAX_NEW),
                "--judge-url", f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"]
        assert main(argv) == 1
        assert "the judge scored none of the 2 responses (2 replies without a score)" in capsys.readouterr().err
        assert main([*argv, "--allow-judge-failures"]) == 0
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("flag,value,message", [("--limit", "-2", "must be >= 0, got -2"),
                                                ("--max-new-tokens", "0", "must be >= 1, got 0"),
                                                ("--batch-size", "0", "must be >= 1, got 0"),
                                                ("--shots", "x", "expected an integer, got 'x'")])
def test_eval_arguments_are_checked(model_dir, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(model_dir), "--task", "viggo", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_more_shots_than_examples_is_a_clear_error(setup, model_dir, tmp_path, capsys):
    recs = instruct_records(setup, n=2)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in recs]))
    model, succ, tok, template = setup
    with pytest.raises(ConfigError, match="--shots 5 needs 5 training examples, got 1"):
        run_eval(model, tok, template, "instruct", recs, shots=5, shot_records=recs[:1])
