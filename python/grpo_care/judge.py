"""Consistency judges: does a completion's `<think>` reasoning support its `<answer>`? (grpo_care.md 9.4)

    judge = make_judge("http")                    # or "offline", "none", "my_pkg.judges:make_judge"
    verdicts = judge_all(judge, [JudgeRequest(question, options, completion)], workers=4)
    verdicts[0].consistent, verdicts[0].status, verdicts[0].reason

The paper's consistency rate is GPT-4.1's binary verdict "the reasoning sufficiently supports the answer"; its
prompt is not published. Two judges implement `Judge.judge(request) -> Verdict`:

- `HTTPJudge`: any OpenAI-compatible `/chat/completions` endpoint, with JUDGE_PROMPT below (model, URL and key
  from the environment: GRPO_CARE_JUDGE_MODEL, GRPO_CARE_JUDGE_URL, GRPO_CARE_JUDGE_API_KEY).
- `OfflineJudge`: no network, no model. It measures one lexical property, exactly: *the option the reasoning
  settles on (the option mentioned last in `<think>`) is the option answered*. Its docstring has the rules.
  It is a cheap proxy for the model judge, not an estimate of it: it cannot tell sound reasoning from unsound.

Shared rules (applied before any judge is asked, so both judges agree on them): a completion without a
`<think>...</think>` or without an `<answer>...</answer>` is judged inconsistent (`no_think` / `no_answer`):
absent reasoning cannot support an answer. A judge that fails (timeout, HTTP error, unparseable reply,
exception) gives `status="unjudged"`, `consistent=None`: the sample is counted unjudged and the run goes on.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
LETTERS = "ABCDEFGHIJ"

JUDGE_SYSTEM_PROMPT = (
    "You are a strict grader of reasoning consistency. You judge whether a model's reasoning supports the "
    "answer it gives. You do not judge whether the answer is correct."
)
JUDGE_PROMPT = """Question (with its answer options):
{question}

The model's reasoning:
<think>
{think}
</think>

The model's final answer: {answer}

Does the reasoning logically lead to and sufficiently support this final answer, without contradicting it \
(for example by concluding that a different option is right)? Ignore whether the answer is actually correct.
Reply with exactly one word: CONSISTENT or INCONSISTENT."""

_VERDICT_WORDS = {"consistent": True, "yes": True, "inconsistent": False, "no": False}


@dataclass
class JudgeRequest:
    """What a judge sees: the question text (options listed in it), the option texts, the raw completion."""

    question: str
    options: list = field(default_factory=list)
    completion: str = ""

    @property
    def think(self) -> str:
        match = THINK_RE.search(self.completion)
        return match.group(1).strip() if match else ""

    @property
    def answer(self) -> str:
        match = ANSWER_RE.search(self.completion)
        return match.group(1).strip() if match else ""


@dataclass
class Verdict:
    """consistent: True / False, or None when unjudged. status: "judged" or "unjudged". reason: why."""

    consistent: Optional[bool]
    status: str
    reason: str
    judge: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def unjudged(cls, reason: str, judge: str = "") -> Verdict:
        return cls(None, "unjudged", reason, judge)


class Judge(Protocol):
    name: str

    def judge(self, request: JudgeRequest) -> Verdict: ...


def judge_one(judge: Judge, request: JudgeRequest) -> Verdict:
    """The shared rules, then `judge.judge`; never raises (a failing judge gives an unjudged verdict)."""
    name = getattr(judge, "name", type(judge).__name__)
    if not THINK_RE.search(request.completion):
        return Verdict(False, "judged", "no_think", name)
    if not ANSWER_RE.search(request.completion):
        return Verdict(False, "judged", "no_answer", name)
    try:
        verdict = judge.judge(request)
    except Exception as e:  # noqa: BLE001 - one bad sample must not stop an evaluation
        return Verdict.unjudged(f"judge raised {type(e).__name__}: {e}", name)
    if isinstance(verdict, bool) or verdict is None:  # a plain callable-style judge
        verdict = Verdict(verdict, "judged", "", name) if verdict is not None else Verdict.unjudged("", name)
    verdict.judge = verdict.judge or name
    return verdict


def judge_all(judge: Judge, requests: list[JudgeRequest], workers: int = 1) -> list[Verdict]:
    """Verdicts in request order; `workers` > 1 sends that many requests at a time (HTTP judges)."""
    if workers <= 1 or len(requests) <= 1:
        return [judge_one(judge, r) for r in requests]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda r: judge_one(judge, r), requests))


# ------------------------------------------------------------------------------------------------------------
# the offline judge


class OfflineJudge:
    """Consistent iff the option mentioned last in `<think>` is the one in `<answer>`. No network, no model.

    Exactly:
    1. The answer must be one option letter (A, B, ... up to the number of options); otherwise inconsistent
       (`answer_not_an_option`).
    2. Mentions of option i in the reasoning (case-insensitive) are: its full text (whitespace normalized,
       a trailing period ignored), and references to its letter L written `option L`, `choice L`,
       `answer L`, `answer is L`, `(L)` or `L.` / `L)` / `L:` followed by a space and then that option's
       first word. A bare `L` is not a mention (it is too often an article: "A person ...").
    3. No mention of any option: inconsistent (`no_option_in_reasoning`).
    4. The option with the latest-ending mention is the one the reasoning settles on. Consistent iff it is the
       answered option (`ok`), else `settles_on_X`.
    It measures agreement between where the reasoning ends and what is answered; it does not check that the
    reasoning is valid or that it refers to the video.
    """

    name = "offline"

    def judge(self, request: JudgeRequest) -> Verdict:
        options = [_option_text(o) for o in request.options]
        letters = LETTERS[: len(options)]
        answer = request.answer.strip()
        if len(answer) != 1 or answer.upper() not in letters:
            return Verdict(False, "judged", "answer_not_an_option", self.name)
        settled = settled_option(request.think, options)
        if settled is None:
            return Verdict(False, "judged", "no_option_in_reasoning", self.name)
        if settled == answer.upper():
            return Verdict(True, "judged", "ok", self.name)
        return Verdict(False, "judged", f"settles_on_{settled}", self.name)


def _option_text(option: str) -> str:
    """Video-R1 options arrive as "A. text": keep the text."""
    match = re.match(r"^\s*[A-J][.)]\s+(.*)$", option, re.DOTALL)
    return (match.group(1) if match else option).strip()


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def settled_option(think: str, options: list[str]) -> Optional[str]:
    """The letter of the option whose last mention in `think` ends latest (OfflineJudge rule 2), or None."""
    text = _normalize(think)
    best, best_end = None, -1
    for i, option in enumerate(options):
        letter = LETTERS[i].lower()
        body = _normalize(option).rstrip(".")
        first_word = re.escape(body.split(" ")[0]) if body else None
        patterns = [
            rf"\b(?:option|choice|answer|answer is)\s*[:(]?\s*{letter}\b\)?",
            rf"\({letter}\)",
        ]
        if body:
            patterns.append(re.escape(body))
        if first_word:
            patterns.append(rf"(?<![a-z0-9]){letter}[.):] {first_word}")
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                if match.end() > best_end:
                    best, best_end = LETTERS[i], match.end()
    return best


# ------------------------------------------------------------------------------------------------------------
# the HTTP judge


def parse_verdict(text: str) -> Optional[bool]:
    """CONSISTENT / INCONSISTENT (or yes / no) as the whole reply or its only verdict word; None otherwise."""
    words = re.findall(r"[a-z]+", text.lower())
    values = {_VERDICT_WORDS[w] for w in words if w in _VERDICT_WORDS}
    # one verdict, in a reply of at most 3 words without a negation: the prompt asks for one word, and a
    # sentence that mentions a verdict word in passing ("not consistent at all") is not a verdict
    if len(values) != 1 or len(words) > 3 or "not" in words:
        return None
    return values.pop()


class HTTPJudge:
    """An OpenAI-compatible chat-completions judge (OpenAI, vLLM `serve`, SGLang, LiteLLM, ...).

    url: the API base (`.../v1`); the request goes to `{url}/chat/completions`. Defaults come from the
    environment: GRPO_CARE_JUDGE_URL (else OPENAI_BASE_URL, else https://api.openai.com/v1),
    GRPO_CARE_JUDGE_MODEL (else "gpt-4.1", the paper's judge), GRPO_CARE_JUDGE_API_KEY (else OPENAI_API_KEY;
    sent as `Authorization: Bearer ...`, omitted when empty, as local servers need none).
    Each request: JUDGE_SYSTEM_PROMPT + JUDGE_PROMPT, temperature 0, max_tokens 8. Timeouts, connection
    errors, 429 and 5xx are retried `max_retries` times (backoff `retry_backoff * 2**attempt` seconds);
    then, like any other HTTP error, bad JSON or an unparseable reply, the verdict is unjudged.
    """

    name = "http"

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
    ):
        env = os.environ
        self.url = (url or env.get("GRPO_CARE_JUDGE_URL") or env.get("OPENAI_BASE_URL") or "").rstrip("/")
        self.url = self.url or "https://api.openai.com/v1"
        self.model = model or env.get("GRPO_CARE_JUDGE_MODEL") or "gpt-4.1"
        self.api_key = (
            api_key
            if api_key is not None
            else (env.get("GRPO_CARE_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or "")
        )
        if "api.openai.com" in self.url and not self.api_key:
            raise ValueError(
                "the HTTP judge points at api.openai.com but no key is set: export GRPO_CARE_JUDGE_API_KEY "
                "(or OPENAI_API_KEY), or set GRPO_CARE_JUDGE_URL to your own OpenAI-compatible server"
            )
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.max_retries, self.retry_backoff = timeout, max_retries, retry_backoff

    def describe(self) -> dict:
        return {"name": self.name, "url": self.url, "model": self.model, "timeout": self.timeout}

    def messages(self, request: JudgeRequest) -> list[dict]:
        prompt = JUDGE_PROMPT.format(
            question=request.question.strip(), think=request.think, answer=request.answer
        )
        return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]

    def judge(self, request: JudgeRequest) -> Verdict:
        body = json.dumps(
            {"model": self.model, "messages": self.messages(request), "temperature": 0, "max_tokens": 8}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            http = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(http, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code == 429 or e.code >= 500:
                    continue
                return Verdict.unjudged(error, self.name)
            except (TimeoutError, OSError) as e:  # socket timeouts, refused connections, URLError
                error = f"{type(e).__name__}: {e}"
                continue
            return self._verdict(payload)
        return Verdict.unjudged(f"{error} (after {self.max_retries + 1} attempts)", self.name)

    def _verdict(self, payload: bytes) -> Verdict:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Verdict.unjudged(f"malformed response: {payload[:120]!r}", self.name)
        verdict = parse_verdict(str(content))
        if verdict is None:
            return Verdict.unjudged(f"unparseable reply: {str(content)[:120]!r}", self.name)
        return Verdict(verdict, "judged", str(content).strip()[:40], self.name)


# ------------------------------------------------------------------------------------------------------------


def make_judge(spec: str, *, timeout: float = 30.0, max_retries: int = 2) -> Optional[Judge]:
    """ "none"/"" -> None, "offline", "http", or a dotted path `pkg.module:factory` (called with no
    arguments; it returns an object with `judge(JudgeRequest) -> Verdict | bool | None` and a `name`)."""
    return judge_factory(spec, timeout=timeout, max_retries=max_retries)()


def judge_factory(spec: str, *, timeout: float = 30.0, max_retries: int = 2) -> Callable[[], Optional[Judge]]:
    """What `make_judge(spec)` calls to build its judge; a ValueError naming the spec when it names nothing (an
    unknown word, a module that does not import, a missing or non-callable factory). No judge is built (a
    dotted path's module is imported, its factory not called), so a spec can be checked before a model loads."""
    spec = (spec or "none").strip()
    if spec.lower() in ("none", ""):
        return lambda: None
    if spec.lower() == "offline":
        return OfflineJudge
    if spec.lower() == "http":
        return functools.partial(HTTPJudge, timeout=timeout, max_retries=max_retries)
    module_name, sep, attr = spec.replace(":", ".").rpartition(".")
    if not sep:
        raise ValueError(
            f"judge must be none, offline, http or a dotted path 'pkg.module:factory', got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"judge {spec!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"judge {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def describe(judge: Optional[Judge]) -> Optional[dict]:
    if judge is None:
        return None
    if hasattr(judge, "describe"):
        return judge.describe()
    return {"name": getattr(judge, "name", type(judge).__name__)}


def consistency_summary(verdicts: list[Optional[dict]]) -> dict:
    """Counts and rates over verdict dicts (None: not judged at all, left out).

    rate = consistent / judged (unjudged samples left out); rate_unjudged_as_inconsistent counts them as 0.
    """
    seen = [v for v in verdicts if v]
    judged = [v for v in seen if v.get("status") == "judged"]
    consistent = sum(1 for v in judged if v.get("consistent"))
    unjudged = len(seen) - len(judged)
    return {
        "rate": consistent / len(judged) if judged else None,
        "rate_unjudged_as_inconsistent": consistent / len(seen) if seen else None,
        "num_consistent": consistent,
        "num_judged": len(judged),
        "num_unjudged": unjudged,
    }
