"""A judge model scores instruction-task responses 0-100 (the ch07 instruct evaluation).

The judge is any chat endpoint: Ollama's `/api/chat` or an OpenAI-compatible
`/v1/chat/completions`, chosen by the URL's path. It is off unless `eval.judge_url` is set.
Only the standard library talks to it, so nothing extra is installed for an optional feature.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from jaxft.config import EvalConfig
from jaxft.errors import JudgeError, JudgeUnreachable

PROMPT = (
    "You grade answers to instructions. Compare the model response with the reference answer "
    "and rate the response from 0 (useless or wrong) to 100 (as good as the reference).\n\n"
    "Instruction:\n{instruction}\n\nReference answer:\n{reference}\n\n"
    "Model response:\n{response}\n\n"
    "Reply with the integer score only.")
# With json_reply the reply is constrained to this schema by the server (Ollama's `format`,
# llama.cpp's `response_format` schema), so even a small judge answers with a score.
SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["score"]}
JSON_ASK = 'Reply with JSON only: {"score": <integer from 0 to 100>}.'

_SCORE = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.])")


def parse_score(text: str) -> int | None:
    """The first whole number in 0..100 in the reply, or None."""
    for m in _SCORE.finditer(text):
        n = int(m.group(1))
        if n <= 100:
            return n
    return None


@dataclass
class JudgeReport:
    scores: list[int | None]  # per response; None where the judge failed
    errors: list[str] = field(default_factory=list)  # one message per failure

    @property
    def mean(self) -> float | None:
        ok = [s for s in self.scores if s is not None]
        return sum(ok) / len(ok) if ok else None


class Judge:
    def __init__(self, url: str, model: str, timeout_s: float = 60.0, json_reply: bool = False):
        path = urllib.parse.urlsplit(url).path.rstrip("/")
        if path.endswith("/v1"):  # an OpenAI-compatible base URL, as servers print it
            url, path = url.rstrip("/") + "/chat/completions", path + "/chat/completions"
        if path.endswith("/api/chat"):
            self.kind = "ollama"
        elif path.endswith("/chat/completions"):
            self.kind = "openai"
        else:
            raise ValueError(f"judge url {url!r}: expected an Ollama .../api/chat or an "
                             "OpenAI-compatible .../v1 or .../v1/chat/completions endpoint")
        self.url, self.model, self.timeout_s, self.json_reply = url, model, timeout_s, json_reply

    def _request(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.kind == "ollama":
            body = {"model": self.model, "messages": messages, "stream": False,
                    "options": {"temperature": 0, "seed": 0}}
            if self.json_reply:
                body["format"] = SCHEMA
        else:
            body = {"model": self.model, "messages": messages, "temperature": 0}
            if self.json_reply:
                body["response_format"] = {"type": "json_object", "schema": SCHEMA}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except (TimeoutError, socket.timeout):
            raise JudgeUnreachable(f"judge {self.url}: no reply within {self.timeout_s:g} s") from None
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge {self.url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise JudgeUnreachable(f"judge {self.url}: no reply within {self.timeout_s:g} s") from None
            raise JudgeUnreachable(f"judge {self.url}: cannot connect ({e.reason})") from None
        except (ConnectionError, http.client.HTTPException) as e:  # the server died mid-reply
            raise JudgeUnreachable(f"judge {self.url}: connection lost ({e!r})") from None
        try:
            reply = json.loads(raw)
            if self.kind == "ollama":
                return reply["message"]["content"]
            return reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.url}: malformed {self.kind} reply: "
                             f"{raw[:200].decode(errors='replace')!r}") from None

    def score(self, instruction: str, reference: str, response: str) -> int:
        prompt = PROMPT.format(instruction=instruction, reference=reference, response=response)
        if self.json_reply:
            prompt = prompt.rsplit("\n", 1)[0] + "\n" + JSON_ASK
        text = self._request(prompt)
        n = parse_score(text)
        if n is None:
            raise JudgeError(f"judge {self.url}: reply has no score from 0 to 100: {text[:200]!r}")
        return n

    def score_all(self, items: list[tuple[str, str, str]]) -> JudgeReport:
        """Scores (instruction, reference, response) triples; a reply without a score is
        recorded and skipped, so one bad reply does not lose the rest of the run. An
        unreachable judge (JudgeUnreachable) ends the run with that error."""
        report = JudgeReport(scores=[])
        for i, (instruction, reference, response) in enumerate(items):
            try:
                report.scores.append(self.score(instruction, reference, response))
            except JudgeUnreachable:
                raise
            except JudgeError as e:
                report.scores.append(None)
                report.errors.append(f"item {i}: {e}")
        return report


def from_config(cfg: EvalConfig) -> Judge | None:
    """The configured judge, or None when `judge_url` is empty (the default)."""
    if not cfg.judge_url:
        return None
    return Judge(cfg.judge_url, cfg.judge_model, cfg.judge_timeout_s, json_reply=cfg.judge_json)
