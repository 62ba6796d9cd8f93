"""The judge client against a local HTTP server that plays Ollama and OpenAI-compatible APIs."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxft.config import EvalConfig
from jaxft.judge import Judge, JudgeError, from_config, parse_score

REQUESTS = []  # (path, body) of every request the server saw


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        REQUESTS.append((self.path, body))
        prompt = body["messages"][0]["content"]
        # The score the server gives is written in the response under test: "... [[42]]".
        score = prompt.split("[[", 1)[1].split("]]", 1)[0] if "[[" in prompt else "50"
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        if self.path.startswith("/broken"):
            payload = b"<html>oops</html>"
        elif self.path.endswith("/api/chat"):
            payload = json.dumps({"model": body["model"], "done": True,
                                  "message": {"role": "assistant", "content": f"Score: {score}"}}).encode()
        else:
            payload = json.dumps({"choices": [{"index": 0, "message": {
                "role": "assistant", "content": f"{score}\n(reasoning omitted)"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except BrokenPipeError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


ITEMS = [("Name a colour.", "Blue.", "Red [[80]]"), ("Add 2 and 2.", "4", "5 [[10]]"),
         ("Say hi.", "Hi!", "Hi! [[100]]")]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_scores_parsed_from_both_apis(server, path):
    REQUESTS.clear()
    judge = from_config(EvalConfig(judge_url=server + path, judge_model="judge-x", judge_timeout_s=5))
    report = judge.score_all(ITEMS)
    assert report.scores == [80, 10, 100] and report.errors == []
    assert report.mean == pytest.approx(190 / 3)
    sent_path, body = REQUESTS[0]
    assert sent_path == path and body["model"] == "judge-x"
    assert "Name a colour." in body["messages"][0]["content"] and "Blue." in body["messages"][0]["content"]
    assert (body.get("stream") is False) == (path == "/api/chat")


def test_malformed_reply_names_endpoint(server):
    judge = Judge(server + "/broken/api/chat", "m", timeout_s=5)
    with pytest.raises(JudgeError, match=r"judge http://127\.0\.0\.1:\d+/broken/api/chat: malformed ollama reply"):
        judge.score(*ITEMS[0])
    report = judge.score_all(ITEMS[:2])
    assert report.scores == [None, None] and report.mean is None
    assert report.errors[1].startswith("item 1: judge http://127.0.0.1")


def test_reply_without_score(server):
    judge = Judge(server + "/api/chat", "m", timeout_s=5)
    with pytest.raises(JudgeError, match="no score from 0 to 100: 'Score: 250'"):
        judge.score("q", "a", "r [[250]]")


def test_timeout_names_endpoint(server):
    judge = Judge(server + "/slow/v1/chat/completions", "m", timeout_s=0.2)
    t = time.perf_counter()
    with pytest.raises(JudgeError, match=r"/slow/v1/chat/completions: no reply within 0\.2 s"):
        judge.score(*ITEMS[0])
    assert time.perf_counter() - t < 0.9


def test_connection_refused_names_endpoint():
    with pytest.raises(JudgeError, match=r"judge http://127\.0\.0\.1:9/api/chat: cannot connect"):
        Judge("http://127.0.0.1:9/api/chat", "m", timeout_s=2).score("q", "a", "r")


def test_off_by_default_and_bad_url():
    assert from_config(EvalConfig()) is None
    with pytest.raises(ValueError, match="expected an Ollama"):
        Judge("http://localhost:11434/", "m")


def test_parse_score():
    assert parse_score("I'd say 85/100.") == 85
    assert parse_score("Score: 7") == 7
    assert parse_score("3.5 stars, so 70") == 70
    assert parse_score("none") is None and parse_score("1000") is None
