"""An LLM judge on any OpenAI-compatible chat endpoint: held-out answers rated against the recipe's rubric.

`eval.judge` names the endpoint (a hosted API, vLLM, or `finetune serve` itself), its model, the NAME of the
environment variable holding its key, and a rubric. Two modes:

- `score`: every answer (tuned, and base where the eval compared it) is rated on `scale`. The first number in
  the judge's reply is its score; a reply with no number on the scale is *unscored*: counted per model and
  listed with its row and reply in judge.json, never dropped from the count silently.
- `pairwise`: tuned and base answers shown together as A and B, in an order drawn per row from the recipe's
  seed; the reply's first word (A, B or tie) picks one. Yields a win rate with a Wilson interval
  (`finetune.review_sheet.Tally`, shared with the human ratings), overall and per slice, and how often the
  judge picked each position with the A share's own interval: the order is a coin flip per row, so a judge
  that favours one position whatever it reads shows as an interval clear of 0.5. A reply that is not a
  choice is unrated, counted and listed with its row.

Replies are cached, one file per request named by the sha256 of the request (judge URL, model, the rendered
rubric, which holds the prompt and the answers, and the reply budget), under RUN/eval/judge-cache/: a rerun
sends nothing, and a changed rubric or answer asks again. The key is read from the environment when the
request is built and goes only into its Authorization header: no file, error or log line holds it.

httpx (a runtime dependency: it is what `openai` itself is built on) does the HTTP; the retries are ours, as
httpx retries only failed connections: a timeout, a refused connection, 429 or 5xx is retried `retries` times
with exponential backoff (0.5 s, 1 s, 2 s, ...); other 4xx are refused at once. An endpoint that cannot be
reached at all is a `JudgeError` naming the URL (exit 1), found before any model loads by `check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.review_sheet import Tally
from finetune.uncertainty import wilson

if TYPE_CHECKING:
    import httpx

    from finetune.recipe.schema import JudgeSection

CACHE_DIR = "judge-cache"  # under RUN/eval/, beside the evaluations it serves
REPLY_EXCERPT = 200  # characters of an unscored reply kept in judge.json
BACKOFF_S = 0.5


class JudgeError(Exception):
    """The judge could not be asked (unreachable, refused, failing): a runtime failure, exit 1, naming its URL."""


@dataclass
class Judge:
    """A client for one judge endpoint with its reply cache; `sent` counts the requests that left this process."""

    config: JudgeSection
    cache: Path
    sent: int = 0
    cached: int = 0
    _client: httpx.Client | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _count(self, name: str) -> None:
        with self._lock:  # ask_all's threads count too
            setattr(self, name, getattr(self, name) + 1)

    @property
    def url(self) -> str:
        return self.config.url.rstrip("/")

    def _http(self) -> httpx.Client:
        import httpx

        with self._lock:  # ask_all's threads share one client: two made at once would leak one's connections
            if self._client is None:
                self._client = httpx.Client(timeout=self.config.timeout, headers=_auth(self.config))
            return self._client

    def check(self) -> None:
        """Reach the endpoint once (GET URL/models) before any work, so a wrong URL costs nothing: JudgeError."""
        import httpx

        try:
            reply = self._http().get(f"{self.url}/models")
        except httpx.HTTPError as e:
            raise JudgeError(f"eval.judge.url {self.url}: the judge is unreachable ({_reason(e)})") from None
        if reply.status_code in (401, 403):
            hint = (
                f"; is ${self.config.api_key_env} its key?"
                if self.config.api_key_env
                else "; set eval.judge.api_key_env"
            )
            raise JudgeError(f"eval.judge.url {self.url}: the judge refused the key (HTTP {reply.status_code}){hint}")

    def ask_all(self, prompts: list[str]) -> list[str]:
        """The judge's replies to these rendered rubrics, in order: cached ones read, the rest sent concurrently."""
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            return list(pool.map(self.ask, prompts))

    def ask(self, prompt: str) -> str:
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
        }
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()
        path = self.cache / f"{key}.json"
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
            self._count("cached")
            return reply
        except (OSError, ValueError, KeyError):
            pass
        reply = self._send(body)
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"request": body, "reply": reply}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return reply

    def _send(self, body: dict[str, Any]) -> str:
        import httpx

        failure = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                self._count("sent")
                response = self._http().post(f"{self.url}/chat/completions", json=body)
            except httpx.HTTPError as e:
                failure = _reason(e)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                failure = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise JudgeError(f"eval.judge.url {self.url}: HTTP {response.status_code}: {response.text[:300]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(
                    f"eval.judge.url {self.url}: not an OpenAI chat completion: {response.text[:300]}"
                ) from None
        raise JudgeError(f"eval.judge.url {self.url}: no reply after {self.config.retries + 1} attempts ({failure})")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _auth(config: JudgeSection) -> dict[str, str]:
    """The Authorization header from the environment variable the recipe names (never the recipe itself)."""
    if config.api_key_env is None:
        return {}
    key = os.environ.get(config.api_key_env)
    if not key:
        raise UserError(f"eval.judge.api_key_env: the environment variable {config.api_key_env} is not set")
    return {"Authorization": f"Bearer {key}"}


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def render(template: str, fields: dict[str, Any]) -> str:
    """The rubric with its {field}s filled; other braces (a JSON example in the rubric) are left as written."""
    return re.sub(r"\{([a-z_]+)\}", lambda m: str(fields.get(m.group(1), m.group(0))), template)


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_score(reply: str, scale: list[int]) -> float | None:
    """The first number in the reply, if it lies on the scale ("4", "Score: 4/5", "4.5"); else None (unscored)."""
    found = _NUMBER.search(reply)
    if found is None:
        return None
    value = float(found.group())
    return value if scale[0] <= value <= scale[1] else None


def parse_choice(reply: str) -> str | None:
    """ "A", "B" or "tie" from the reply's first word ("A", "b.", "Tie!"); else None (not a choice)."""
    words = re.findall(r"[A-Za-z]+", reply)
    if not words:
        return None
    word = words[0].lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(word)


def judge_examples(config: JudgeSection, examples: list[dict[str, Any]], judge: Judge, seed: int) -> dict[str, Any]:
    """judge.json's content for eval/examples.jsonl rows (prompt, reference, tuned, base answers)."""
    run = _score if config.mode == "score" else _pairwise
    report = run(config, examples, judge.ask_all, seed)
    head = {"mode": config.mode, "url": judge.url, "model": config.model, "rubric": config.template()}
    return head | report | {"requests": {"sent": judge.sent, "cached": judge.cached}}


def _fields(row: dict[str, Any], config: JudgeSection) -> dict[str, Any]:
    return {"prompt": row["prompt"], "reference": row["reference"], "min": config.scale[0], "max": config.scale[1]}


def _score(
    config: JudgeSection, examples: list[dict[str, Any]], ask: Callable[[list[str]], list[str]], seed: int
) -> dict[str, Any]:
    """Each model's answers rated; mean over the scored ones, the unscored counted and listed by row."""
    models = [m for m in ("tuned", "base") if examples and examples[0].get(m) is not None]
    template = config.template()
    out: dict[str, Any] = {"scale": config.scale, "models": {}, "unscored": [], "rows": []}
    scores: dict[str, list[float | None]] = {}
    for model in models:
        replies = ask([render(template, _fields(row, config) | {"answer": row[model]}) for row in examples])
        scores[model] = [parse_score(r, config.scale) for r in replies]
        out["unscored"] += [
            {"row": i, "model": model, "reply": r[:REPLY_EXCERPT]}
            for i, (r, s) in enumerate(zip(replies, scores[model], strict=True))
            if s is None
        ]
        rated = [s for s in scores[model] if s is not None]
        out["models"][model] = {
            "mean": sum(rated) / len(rated) if rated else None,
            "scored": len(rated),
            "unscored": len(replies) - len(rated),
        }
    out["rows"] = [{m: scores[m][i] for m in models} for i in range(len(examples))]
    return out


def _pairwise(
    config: JudgeSection, examples: list[dict[str, Any]], ask: Callable[[list[str]], list[str]], seed: int
) -> dict[str, Any]:
    """Tuned against base, in a seeded random order per row: win rate, ties, unparsed replies, position picks."""
    if not examples or examples[0].get("base") is None:
        raise UserError("eval.judge.mode pairwise compares tuned with base answers: evaluate with --against base")
    rng = random.Random(seed)
    tuned_first = [rng.random() < 0.5 for _ in examples]
    template = config.template()
    prompts = [
        render(template, _fields(row, config) | _order(row, first))
        for row, first in zip(examples, tuned_first, strict=True)
    ]
    replies = ask(prompts)
    tally, slices, position = Tally(), defaultdict(Tally), {"A": 0, "B": 0, "tie": 0}
    out: dict[str, Any] = {"seed": seed, "unparsed": [], "rows": []}
    for i, (row, reply, first) in enumerate(zip(examples, replies, tuned_first, strict=True)):
        choice = parse_choice(reply)
        if choice is None:
            out["unparsed"].append({"row": i, "reply": reply[:REPLY_EXCERPT]})
            outcome = ""  # unrated: counted, never dropped
        else:
            position[choice] += 1
            outcome = "tie" if choice == "tie" else "tuned" if (choice == "A") == first else "base"
        tally.add(outcome)
        if row.get("slice") is not None:
            slices[str(row["slice"])].add(outcome)
        out["rows"].append({"tuned_as": "A" if first else "B", "choice": choice})
    return out | {
        "preference": tally.to_dict(),
        "slices": {name: slices[name].to_dict() for name in sorted(slices)},
        "position": _position(position),
    }


def _position(picks: dict[str, int]) -> dict[str, Any]:
    """The judge's picks by position, with the share of decisive picks that went to A and its Wilson interval:
    the order is a coin flip per row, so an interval that excludes 0.5 is a judge reading positions, not answers."""
    decisive = picks["A"] + picks["B"]
    interval = wilson(picks["A"], decisive)
    return picks | {
        "A_share": picks["A"] / decisive if decisive else None,
        "A_share_interval": list(interval) if interval else None,
    }


def _order(row: dict[str, Any], tuned_first: bool) -> dict[str, str]:
    first, second = ("tuned", "base") if tuned_first else ("base", "tuned")
    return {"answer_a": row[first], "answer_b": row[second]}


def open_judge(config: JudgeSection, eval_dir: Path) -> Judge:
    """The judge of `eval.judge`, checked reachable, its cache in RUN/eval/judge-cache/."""
    judge = Judge(config, eval_dir / CACHE_DIR)
    judge.check()
    return judge


def judge_file(judge: Judge, examples_path: Path, seed: int) -> dict[str, Any]:
    """Judge an evaluation's examples.jsonl and write judge.json beside it; returns what it wrote."""
    examples = [json.loads(line) for line in examples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = [row for row in examples if row.get("tuned") is not None]
    if not examples:
        raise UserError(f"{examples_path}: no generated answers to judge: eval.metrics needs a generation metric")
    try:
        report = judge_examples(judge.config, examples, judge, seed)
    finally:
        judge.close()
    tmp = examples_path.with_name("judge.json.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(examples_path.with_name("judge.json"))
    return report
