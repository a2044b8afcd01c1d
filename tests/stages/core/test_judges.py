"""The independent judges: program-check verdicts, and a pairwise judge asked in both orders."""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.core.errors import ConfigError, LorelayError
from stages.core.judges import (JudgeConfig, LocalModelJudge, check_verdicts, parse_choice, swapped_verdicts,
                                tally)


class ChatCompletions(BaseHTTPRequestHandler):
    """A loopback stand-in for an OpenAI-compatible server: POST /v1/chat/completions.

    ``server.rule(reply_a, reply_b) -> str`` decides the answer; every request is recorded.
    """

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        case = body["messages"][-1]["content"]
        reply_a = case.split("Reply A:\n")[1].split("\n\nReply B:")[0]
        reply_b = case.split("Reply B:\n")[1].split("\n\nWhich reply")[0]
        answer = self.server.rule(reply_a, reply_b)
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_chat_completions(rule=lambda a, b: "A"):
    """The stand-in server on a free loopback port; yields its base URL (``.../v1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    server.requests, server.rule = [], rule
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def endpoint():
    with serve_chat_completions() as server:
        yield server


def endpoint_judge(server, monkeypatch, **extra):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    return JudgeConfig(url=f"http://127.0.0.1:{server.server_address[1]}/v1", endpoint_model="judge-1",
                       api_key_env="JUDGE_KEY", timeout=5, **extra).build()


def test_endpoint_judge_counts_a_tie_when_the_two_orders_disagree(endpoint, monkeypatch):
    judge = endpoint_judge(endpoint, monkeypatch)
    prompts, mine, theirs = ["q1", "q2", "q3"], ["signed. Nimbus Support", "same", "plain"], \
        ["plain", "same", "signed. Nimbus Support"]

    endpoint.rule = lambda a, b: "A"  # pure position bias: always the first reply shown
    assert swapped_verdicts(judge, prompts, mine, theirs) == [0, 0, 0]
    # identical replies are never sent; the other two are asked in both orders, with the key and the rubric
    assert len(endpoint.requests) == 4
    assert {r["path"] for r in endpoint.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in endpoint.requests} == {"Bearer sk-test"}
    first = endpoint.requests[0]["body"]
    assert first["model"] == "judge-1" and first["temperature"] == 0.0
    assert first["messages"][0]["role"] == "system" and "A or B" in first["messages"][0]["content"]

    endpoint.rule = lambda a, b: "A" if "Nimbus Support" in a else "B."  # consistent: prefers the signed reply
    verdicts = swapped_verdicts(judge, prompts, mine, theirs)
    assert verdicts == [1, 0, -1]
    assert tally(verdicts, "judge_") == {"judge_wins": 1, "judge_losses": 1, "judge_ties": 1,
                                         "judge_win_rate_vs_parent": 1 / 3, "judge_loss_rate_vs_parent": 1 / 3}

    endpoint.requests.clear()
    endpoint_judge(endpoint, monkeypatch, rubric="Prefer the signed reply. A or B.").choose(["q"], ["a"], ["b"])
    assert endpoint.requests[0]["body"]["messages"][0]["content"] == "Prefer the signed reply. A or B."


def test_endpoint_errors_and_bad_judge_configs_are_clean(endpoint, monkeypatch):
    port = endpoint.server_address[1]
    endpoint.shutdown()
    endpoint.server_close()
    judge = endpoint_judge(endpoint, monkeypatch)
    with pytest.raises(LorelayError, match=f"judge endpoint http://127.0.0.1:{port}/v1 failed"):
        judge.choose(["q"], ["a"], ["b"])
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ConfigError, match="JUDGE_KEY is not set"):
        JudgeConfig(url="http://127.0.0.1:1/v1", endpoint_model="m", api_key_env="JUDGE_KEY").build()
    with pytest.raises(ConfigError, match="not both or neither"):
        JudgeConfig()
    with pytest.raises(ConfigError, match="endpoint_model"):
        JudgeConfig(url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="not an http"):
        JudgeConfig(url="127.0.0.1:1", endpoint_model="m")


def test_parse_choice_reads_one_letter():
    assert [parse_choice(t) for t in ["A", "b.", "Reply B", "**A**", "A or B", "neither", ""]] == \
        ["A", "B", "B", "A", None, None, None]


def test_check_verdicts_count_passed_applicable_checks():
    mine = [{"queue": True, "sign_off": None}, {"queue": None, "sign_off": False}, {"queue": False, "sign_off": None}]
    theirs = [{"queue": False, "sign_off": None}, {"queue": None, "sign_off": False}, {"queue": True, "sign_off": None}]
    assert check_verdicts(mine, theirs) == [1, 0, -1]


def test_local_model_judge_is_consistent_only_when_both_orders_agree(tiny_model_dir):
    judge = LocalModelJudge(tiny_model_dir)
    prompts, mine, theirs = ["Route this ticket: lost parcel"] * 3, ["delivery", "payment", "x"], ["payment", "delivery", "x"]
    forward = judge.choose(prompts, mine, theirs)
    backward = judge.choose(prompts, theirs, mine)
    expected = [1 if f == "A" and b == "B" else -1 if f == "B" and b == "A" else 0
                for f, b in zip(forward, backward)]
    expected[2] = 0  # identical replies
    assert swapped_verdicts(judge, prompts, mine, theirs) == expected
    assert set(forward) <= {"A", "B"}
