"""Consistency judges: the offline rule, verdict parsing, and the HTTP judge against a stub OpenAI-compatible
server on 127.0.0.1 (good replies, a slow server, garbage bodies, babble, HTTP 500, a closed port)."""

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from grpo_care.judge import (
    HTTPJudge,
    JudgeRequest,
    OfflineJudge,
    consistency_summary,
    judge_all,
    judge_one,
    make_judge,
    parse_verdict,
)

OPTIONS = ["open fridge", "take knife", "wash tomato", "cut onion"]
QUESTION = "What should I do next?Options:\n" + "\n".join(f"{c}. {o}" for c, o in zip("ABCD", OPTIONS))


def request(think: str, answer: str = "B") -> JudgeRequest:
    return JudgeRequest(QUESTION, OPTIONS, f"<think>{think}</think><answer>{answer}</answer>")


@contextlib.contextmanager
def stub_server(slow_seconds: float = 1.5):
    """An OpenAI-compatible /v1/chat/completions stub. What it does depends on words in the reasoning:
    SLOW sleeps, GARBAGE answers a non-JSON body, BABBLE an unparseable reply, ERROR500 an HTTP 500, GOOD
    "CONSISTENT", anything else "INCONSISTENT". Yields (base url, list of received requests)."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = body["messages"][-1]["content"]
            if "SLOW" in prompt:
                time.sleep(slow_seconds)
            if "ERROR500" in prompt:
                self.send_response(500)
                self.end_headers()
                return
            if "GARBAGE" in prompt:
                payload = b"<html>not json"
            else:
                reply = (
                    "I think it might be fine"
                    if "BABBLE" in prompt
                    else ("CONSISTENT" if "GOOD" in prompt else "INCONSISTENT.")
                )
                payload = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()


def test_offline_judge_rules():
    judge = OfflineJudge()
    verdict = judge_one(judge, request("The pot boils; wait, A is wrong. So the answer is option B.", "B"))
    assert (verdict.consistent, verdict.status, verdict.reason) == (True, "judged", "ok")
    # the last option the reasoning names (by its text) is C, but B is answered
    verdict = judge_one(judge, request("Maybe option B... hmm, I should wash tomato first.", "B"))
    assert (verdict.consistent, verdict.reason) == (False, "settles_on_C")
    assert judge_one(judge, request("Take knife. Then (D).", "D")).consistent is True
    assert judge_one(judge, request("B. take knife is what the video shows", "B")).consistent is True
    # a bare letter used as an article is not a mention of option A
    assert judge_one(judge, request("A person is in a kitchen.", "A")).reason == "no_option_in_reasoning"
    assert judge_one(judge, request("option B", "E")).reason == "answer_not_an_option"
    assert judge_one(judge, request("option B", "B. take knife")).reason == "answer_not_an_option"
    # shared rules: no <think> or no <answer> is inconsistent without asking the judge
    assert judge_one(judge, JudgeRequest(QUESTION, OPTIONS, "<answer>B</answer>")).reason == "no_think"
    assert judge_one(judge, JudgeRequest(QUESTION, OPTIONS, "<think>option B</think>B")).reason == "no_answer"
    # Video-R1 options carry their letter
    video_r1 = JudgeRequest("q", ["A. red", "B. blue"], "<think>It is blue.</think><answer>B</answer>")
    assert judge_one(judge, video_r1).consistent is True


def test_parse_verdict():
    assert parse_verdict("CONSISTENT") is True
    assert parse_verdict(" Inconsistent.\n") is False
    assert parse_verdict("yes") is True and parse_verdict("No") is False
    assert parse_verdict("not consistent") is None  # a negation is not a one-word verdict
    assert parse_verdict("consistent / inconsistent") is None
    assert parse_verdict("The reasoning is mostly consistent overall") is None
    assert parse_verdict("") is None


def test_http_judge_against_a_stub_server(monkeypatch):
    with stub_server() as (url, received):
        monkeypatch.setenv("GRPO_CARE_JUDGE_URL", url)
        monkeypatch.setenv("GRPO_CARE_JUDGE_MODEL", "judge-model")
        monkeypatch.setenv("GRPO_CARE_JUDGE_API_KEY", "secret")
        judge = HTTPJudge(timeout=0.3, max_retries=1, retry_backoff=0.0)
        requests = [
            request("GOOD: so option B"),
            request("so option C, yet I answer B"),
            request("SLOW thinking, option B"),
            request("GARBAGE option B"),
            request("BABBLE option B"),
            request("ERROR500 option B"),
            JudgeRequest(QUESTION, OPTIONS, "no tags at all"),
        ]
        started = time.perf_counter()
        verdicts = judge_all(judge, requests, workers=4)
        elapsed = time.perf_counter() - started
    assert [v.consistent for v in verdicts] == [True, False, None, None, None, None, False]
    assert [v.status for v in verdicts] == ["judged", "judged"] + ["unjudged"] * 4 + ["judged"]
    assert "TimeoutError" in verdicts[2].reason or "timed out" in verdicts[2].reason
    assert "malformed response" in verdicts[3].reason and "unparseable reply" in verdicts[4].reason
    assert verdicts[5].reason.startswith("HTTP 500 (after 2 attempts)")
    assert verdicts[6].reason == "no_think"  # never sent
    assert elapsed < 5.0  # the slow server cost two 0.3 s timeouts, not its 1.5 s sleeps in series
    summary = consistency_summary([v.to_dict() for v in verdicts])
    assert summary == {
        "rate": 1 / 3,  # judged: the 2 answered by the server and the untagged one; 1 consistent
        "rate_unjudged_as_inconsistent": 1 / 7,
        "num_consistent": 1,
        "num_judged": 3,
        "num_unjudged": 4,
    }

    first = received[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    prompt = next(r for r in received if "GOOD" in r["body"]["messages"][-1]["content"])["body"]["messages"][
        -1
    ]
    assert "C. wash tomato" in prompt["content"] and "final answer: B" in prompt["content"]
    # retried: the slow and the 500 requests were sent twice each; the untagged completion never
    sent = [r["body"]["messages"][-1]["content"] for r in received]
    assert sum("SLOW" in p for p in sent) == 2 and sum("ERROR500" in p for p in sent) == 2
    assert not any("no tags at all" in p for p in sent)


def test_http_judge_with_nothing_listening_is_unjudged():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    judge = HTTPJudge(url=f"http://127.0.0.1:{port}/v1", api_key="", timeout=0.5, max_retries=0)
    verdict = judge_one(judge, request("option B"))
    assert verdict.status == "unjudged" and verdict.consistent is None


class _Exploding:
    name = "exploding"

    def judge(self, request):
        raise RuntimeError("boom")


def make_exploding():
    return _Exploding()


def test_make_judge_and_failing_judges(monkeypatch):
    assert make_judge("none") is None and make_judge("") is None
    assert isinstance(make_judge("offline"), OfflineJudge)
    monkeypatch.delenv("GRPO_CARE_JUDGE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("GRPO_CARE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no key is set"):
        make_judge("http")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert make_judge("http").url == "https://api.openai.com/v1"
    judge = make_judge(f"{__name__}:make_exploding")
    verdict = judge_one(judge, request("option B"))
    assert verdict.status == "unjudged" and "RuntimeError: boom" in verdict.reason
    with pytest.raises(ValueError, match="dotted path"):
        make_judge("gpt4")
