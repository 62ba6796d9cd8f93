"""The ch07 judge against a real OpenAI-compatible server: llama-cpp-python's, on loopback,
serving SmolLM2-135M-Instruct from its GGUF. A 135M judge scores poorly; this tests the
protocol, the parsing and the failure modes, with a real server."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import smollm2_gguf
from flax import nnx

from jaxft.config import get_preset
from jaxft.__main__ import main
from jaxft.judge import Judge, JudgeUnreachable
from jaxft.model import Llama
from jaxft.modeldir import save_model

pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] (pip install -e '.[test]')")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct-ch07" / "instruction-data.json"
N_ITEMS, TIMEOUT = 3, 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    """llama-cpp-python's OpenAI-compatible server; its ~200 kB of load log goes to a file
    (a pipe nobody reads would fill and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
             "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=f, stderr=subprocess.STDOUT)


def wait_ready(proc, base: str, log: Path, limit_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                if r.status == 200 and json.loads(r.read())["data"]:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"llama_cpp.server did not answer {base}/models within {limit_s:g} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("srv") / "server.log"
    proc = start_server(port, log, "--model_alias", "smollm2", "--n_ctx", "1024", "--n_threads", "2")
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, base, log)
        yield proc, base
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # in case a test left it stopped
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_tokenizer):
    """A tiny jaxft model to answer the ch07 instructions (its answers are noise)."""
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=len(sp_tokenizer))
    return save_model(tmp_path_factory.mktemp("m") / "tiny", Llama(cfg, nnx.Rngs(0)), sp_tokenizer)


def judged_eval(model_dir, out, base, *extra) -> list[str]:
    """`jaxft eval` of N_ITEMS ch07 instructions, judged by the server at `base`."""
    return ["eval", "--ckpt", str(model_dir), "--task", "instruct", "--limit", str(N_ITEMS),
            "--template", "alpaca", "--max-new-tokens", "8", "--out", str(out),
            "--judge-url", base, "--judge-model", "smollm2", "--judge-timeout", str(TIMEOUT), *extra]


def test_eval_instruct_scored_by_real_server(server, model_dir, tmp_path, capsys):
    if not DATA.is_file():
        pytest.skip(f"ch07 data not found at {DATA}")
    _, base = server
    out = tmp_path / "ev"
    # a 135M judge may score none; the counts are checked
    argv = judged_eval(model_dir, out, base, "--allow-judge-failures")
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["n"] == N_ITEMS
    scores = [r["judge_score"] for r in rows]
    assert all(s is None or (isinstance(s, int) and 0 <= s <= 100) for s in scores), scores
    assert metrics["judge_scored"] == sum(s is not None for s in scores)
    assert metrics["judge_scored"] + metrics["judge_failed"] == N_ITEMS
    err = capsys.readouterr().err
    assert err.count("reply has no score") + err.count("malformed") == metrics["judge_failed"]


def test_json_schema_makes_the_small_judge_score_every_response(server, model_dir, tmp_path, capsys):
    """--judge-json: llama.cpp constrains the reply to {"score": N}, so the 135M judge that
    mostly answers the instruction instead (above) scores every response."""
    if not DATA.is_file():
        pytest.skip(f"ch07 data not found at {DATA}")
    _, base = server
    out = tmp_path / "ev"
    argv = judged_eval(model_dir, out, base, "--judge-json")
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge_scored"] == N_ITEMS and metrics["judge_failed"] == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(0 <= r["judge_score"] <= 100 for r in rows)


def test_stopped_server_is_a_timeout_error(server):
    proc, base = server
    judge = Judge(base, "smollm2", timeout_s=2.0)
    os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: the accept queue holds the request
    try:
        t0 = time.monotonic()
        with pytest.raises(JudgeUnreachable, match=r"/v1/chat/completions: no reply within 2 s"):
            judge.score_all([("Say hi.", "Hi!", "Hi!")] * 5)  # stops at the first, not 5 x 2 s
        assert time.monotonic() - t0 < 4.0
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_dead_server_and_closed_port_are_clear_errors(model_dir, tmp_path, capsys):
    """A judge that is gone (a server killed mid-run leaves its port like this) fails the
    run at once with the URL in the message; nothing is written."""
    base = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    argv = ["eval", "--ckpt", str(model_dir), "--task", "instruct", "--limit", "2",
            "--template", "alpaca", "--max-new-tokens", "4", "--out", str(tmp_path / "ev"),
            "--judge-url", base, "--judge-model", "x", "--judge-timeout", "5"]
    if not DATA.is_file():
        pytest.skip(f"ch07 data not found at {DATA}")
    assert main(argv) == 2
    assert time.monotonic() - t0 < 120  # generation included; the judge part fails at once
    err = capsys.readouterr().err
    assert f"judge {base}/chat/completions: cannot connect" in err and not (tmp_path / "ev").exists()


def test_server_killed_mid_run(tmp_path):
    """A second server, killed after its first reply: the next request fails at once."""
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(port, log, "--n_ctx", "512", "--n_threads", "1")
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, base, log)
        judge = Judge(base, "m", timeout_s=TIMEOUT)
        judge._request("Reply with the number 7 only.")  # a real reply first
        proc.kill()
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(JudgeUnreachable, match="cannot connect|connection lost"):
            judge.score_all([("Say hi.", "Hi!", "Hi!")] * 3)
        assert time.monotonic() - t0 < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
