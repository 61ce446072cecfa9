"""The LLM judge (eval.judge): against a live `finetune serve` of a tiny run, started here, and for the numeric
path and the retries against a scripted endpoint; the blind review sheet's CLI round trip on the same run.

The live judge is the tiny run itself, greedy, with a fixed rubric: what it says is not a real score, but it
is deterministic, so the test checks every reply it gave was parsed as `parse_score` parses it, counted
(scored or unscored, per row), cached, and that its key reached no file.
"""

from __future__ import annotations

import csv
import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import tiny
import yaml
from helpers import write_recipe
from typer.testing import CliRunner

from finetune.cli import app
from finetune.judge import CACHE_DIR, Judge, JudgeError, judge_examples, parse_choice, parse_score, render
from finetune.recipe.schema import JudgeSection
from finetune.uncertainty import wilson

SECRET = "sk-judge-planted-7f3e9a1c5b"  # planted in the environment: must reach no file the run writes
KEY_ENV = "FINETUNE_TEST_JUDGE_KEY"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("4", 4.0), (" Score: 2/5", 2.0), ("3.5 out of 5", 3.5), ("9", None), ("0", None), ("great!", None), ("", None)],
)
def test_a_score_is_the_first_number_on_the_scale(reply, expected):
    assert parse_score(reply, [1, 5]) == expected


@pytest.mark.parametrize(
    ("reply", "expected"), [("A", "A"), ("b.", "B"), (" Tie!", "tie"), ("Answer A", None), ("", None), ("AB", None)]
)
def test_a_choice_is_the_first_word(reply, expected):
    assert parse_choice(reply) == expected


def test_the_rubric_keeps_braces_that_are_not_its_fields():
    assert render('{answer} as {"score": n}', {"answer": "x"}) == 'x as {"score": n}'


@pytest.mark.parametrize(
    ("judge", "message"),
    [
        (
            "{url: http://h/v1, model: m, rubric: 'Rate {anwser}'}",
            r"eval\.judge\.rubric: unknown field\(s\) \['anwser'\]",
        ),
        ("{url: http://h/v1, model: m, mode: pairwise, rubric: 'Rate {answer}'}", r"needs \{answer_a\}, \{answer_b\}"),
        ("{url: http://h/v1, model: m, scale: [5, 1]}", r"eval\.judge\.scale: must be \[lowest, highest\]"),
        ("{url: http://h/v1, model: m, api_key_env: 'sk-123'}", r"eval\.judge\.api_key_env"),
        ("{url: h/v1, model: m}", r"eval\.judge\.url"),
    ],
)
def test_a_wrong_judge_section_is_a_located_recipe_error(tmp_path, judge, message):
    check_judge(tmp_path, judge, message)


def test_a_judge_needs_generated_answers(tmp_path):
    check_judge(tmp_path, "{url: http://h/v1, model: m}\n  metrics: [loss]", r"eval\.judge: rates generated answers")


def check_judge(tmp_path, judge, message):
    from finetune.errors import RecipeError
    from finetune.recipe.load import load_recipe

    recipe = write_recipe(tmp_path, tmp_path)
    recipe.write_text(recipe.read_text().replace("  max_new_tokens: 6\n", f"  max_new_tokens: 6\n  judge: {judge}\n"))
    with pytest.raises(RecipeError, match=message) as raised:
        load_recipe(recipe, check_files=False)
    assert "recipe.yaml:" in str(raised.value)  # located in the file


# --- a scripted endpoint: the numeric and pairwise paths, retries, refusals ------------------------------------


class Scripted:
    """An OpenAI-shaped endpoint that answers from a script: replies by prompt substring, failures first."""

    def __init__(self, replies: dict[str, str], fail_first: int = 0, status: int = 503):
        self.replies, self.failures, self.status, self.posts = replies, fail_first, status, 0
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._send(200, {"data": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scripted.posts += 1
                if scripted.failures:
                    scripted.failures -= 1
                    return self._send(scripted.status, {"error": {"message": "scripted failure"}})
                prompt = body["messages"][0]["content"]
                reply = next(r for k, r in scripted.replies.items() if k in prompt)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


ROWS = [{"prompt": f"p{i}", "reference": "r", "tuned": f"tuned-{i}", "base": f"base-{i}"} for i in range(4)]


def test_scores_are_parsed_and_an_answer_that_is_not_a_score_is_counted_by_row(tmp_path):
    replies = {"tuned-0": "5", "tuned-1": "Score: 4/5", "tuned-2": "4", "tuned-3": "excellent",
               "base-0": "2", "base-1": "1", "base-2": "9", "base-3": "3"}  # fmt: skip
    endpoint = Scripted(replies, fail_first=2)  # two 503s: retried with backoff, then answered
    try:
        config = JudgeSection(url=endpoint.url, model="judge", retries=2, concurrency=2)
        judge = Judge(config, tmp_path / "cache")
        report = judge_examples(config, ROWS, judge, seed=0)
    finally:
        endpoint.close()
    assert report["models"]["tuned"] == {"mean": pytest.approx(13 / 3), "scored": 3, "unscored": 1}
    assert report["models"]["base"] == {"mean": 2.0, "scored": 3, "unscored": 1}  # 9 is off the 1-5 scale
    assert [(u["row"], u["model"], u["reply"]) for u in report["unscored"]] == [
        (3, "tuned", "excellent"),
        (2, "base", "9"),
    ]
    assert report["rows"][1] == {"tuned": 4.0, "base": 1.0}
    assert report["requests"] == {"sent": 10, "cached": 0} and endpoint.posts == 10  # 8 answers + 2 retried


def test_pairwise_gives_a_win_rate_per_slice_and_counts_position_bias(tmp_path):
    endpoint = Scripted({"Request:\np3\n": "maybe", "Answer A": "A"})  # picks the first answer shown; row 3: no
    try:
        config = JudgeSection(url=endpoint.url, model="judge", mode="pairwise", timeout=5, retries=0)
        rows = [{**ROWS[0], "prompt": f"p{i}", "slice": "odd" if i % 2 else "even"} for i in range(40)]
        report = judge_examples(config, rows, Judge(config, tmp_path / "cache"), seed=7)
        again = judge_examples(config, rows, Judge(config, tmp_path / "cache2"), seed=7)["rows"]
    finally:
        endpoint.close()
    tuned_first = [r["tuned_as"] == "A" for r in report["rows"]]
    firsts = sum(tuned_first[:3] + tuned_first[4:])
    assert 0 < firsts < 39  # the order is drawn per row
    preference = report["preference"]
    assert (preference["wins"], preference["losses"], preference["unrated"]) == (firsts, 39 - firsts, 1)
    assert report["unparsed"] == [{"row": 3, "reply": "maybe"}] and report["rows"][3]["choice"] is None
    assert report["position"] == {
        "A": 39,
        "B": 0,
        "tie": 0,
        "A_share": 1.0,
        "A_share_interval": list(wilson(39, 39)),
    }
    even, odd = report["slices"]["even"], report["slices"]["odd"]
    assert even["wins"] == sum(tuned_first[0::2]) and (even["wins"] + even["losses"], even["unrated"]) == (20, 0)
    assert odd["wins"] == sum(tuned_first[1::2]) - tuned_first[3] and odd["unrated"] == 1  # row 3 is odd
    assert again == report["rows"]  # seeded


def test_a_refusal_is_not_retried_and_an_exhausted_retry_names_the_url(tmp_path):
    for status, retries, posts, message in ((400, 3, 1, "HTTP 400"), (503, 1, 2, "no reply after 2 attempts")):
        endpoint = Scripted({"": "1"}, fail_first=9, status=status)
        try:
            config = JudgeSection(url=endpoint.url, model="judge", retries=retries)
            with pytest.raises(JudgeError, match=message) as raised:
                Judge(config, tmp_path / "cache").ask("rate this")
        finally:
            endpoint.close()
        assert endpoint.url in str(raised.value) and endpoint.posts == posts


# --- the live judge: `finetune serve` of a tiny run --------------------------------------------------------------


class Counting:
    """ASGI wrapper around serve's app: the paths of the requests it received, for the test to read."""

    def __init__(self, app):
        self.app, self.paths = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)

    def chats(self) -> int:
        return self.paths.count("/v1/chat/completions")


def one_word_adapter(root: Path, base: Path, word: str) -> Path:
    """An adapter on the tiny base taught to answer every prompt with `word`: a judge whose verdict is known."""
    rows = [{"messages": [r["messages"][0], {"role": "assistant", "content": word}]} for r in tiny.reverse_rows(16)]
    data = tiny.write_jsonl(root / f"{word}.jsonl", rows)
    recipe = root / f"say-{word}.yaml"
    recipe.write_text(
        f"name: say-{word}\nmodel: {{base: {base}}}\nlora: {{rank: 8, alpha: 16}}\n"
        f"data: {{train: [{{path: {data}}}], max_seq_length: 64}}\n"
        "train: {max_steps: 12, lr: 2.0e-2, batch_size: 8, warmup_ratio: 0.0, gradient_checkpointing: false}\n"
        f"output_dir: {root / f'say-{word}'}\n"
    )
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    return root / f"say-{word}"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    """A tiny run trained one step (eval with base), served by `finetune serve`'s app under uvicorn, key required,
    beside an adapter on the same base that answers "B" to anything (model `say-B`: the pairwise test's judge)."""
    import uvicorn

    from finetune.inference.serve import Limits, create_app, load_models

    root = tmp_path_factory.mktemp("judge")
    port = free_port()
    recipe = write_recipe(root, tiny_model_dir())
    text = recipe.read_text().replace("max_steps: 8", "max_steps: 1").replace("max_new_tokens: 6", "max_new_tokens: 4")
    judge = f"  judge: {{url: 'http://127.0.0.1:{port}/v1', model: tiny, api_key_env: {KEY_ENV}}}\n"
    recipe.write_text(
        text.replace("  max_new_tokens: 4\n", "  max_new_tokens: 4\n  limit: 4\n  metrics: [exact_match]\n" + judge)
    )
    assert runner.invoke(app, ["train", str(recipe), "--set", f"output_dir={root / 'run'}"]).exit_code == 0
    run = root / "run"
    judge_b = one_word_adapter(root, tiny_model_dir(), "B")
    counting = Counting(create_app(load_models([run, judge_b], Limits(max_tokens=16)), SECRET))
    server = uvicorn.Server(uvicorn.Config(counting, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield run, counting, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)


def set_judge(run: Path, **fields) -> None:
    """Change the run's eval.judge (its resolved recipe.yaml), as a user would edit it."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["eval"]["judge"] |= fields
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_the_live_judge_scores_caches_and_keeps_its_key_out_of_every_file(live, monkeypatch):
    run, counting, url = live
    monkeypatch.setenv(KEY_ENV, SECRET)
    first = runner.invoke(app, ["eval", str(run), "--limit", "2", "--json"])
    assert first.exit_code == 0, first.stderr[-2000:]
    report = json.loads(first.stdout)["judge"]
    rows = len(report["rows"])
    assert rows == 2 and set(report["models"]) == {"tuned", "base"}
    asked = counting.chats()
    assert 1 <= asked == report["requests"]["sent"] <= 2 * rows  # identical rubrics are asked once
    for m in report["models"].values():
        assert m["scored"] + m["unscored"] == rows  # every answer is scored or counted unscored
    # each reply is what the server answers the same request, parsed as parse_score parses it
    examples = [json.loads(line) for line in (Path(json.loads(first.stdout)["out_dir"]) / "examples.jsonl").open()]
    config = JudgeSection(url=url, model="tiny")
    headers = {"Authorization": f"Bearer {SECRET}"}
    unscored = {(u["row"], u["model"]): u["reply"] for u in report["unscored"]}
    for i, row in enumerate(examples[:1]):
        fields = {"prompt": row["prompt"], "reference": row["reference"], "answer": row["tuned"], "min": 1, "max": 5}
        body = {"model": "tiny", "messages": [{"role": "user", "content": render(config.template(), fields)}],
                "temperature": 0, "max_tokens": 16}  # fmt: skip
        reply = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60).json()
        text = reply["choices"][0]["message"]["content"]
        assert report["rows"][i]["tuned"] == parse_score(text, [1, 5])
        assert (report["rows"][i]["tuned"] is None) == ((i, "tuned") in unscored)
    before = counting.chats()
    again = runner.invoke(app, ["eval", str(run), "--limit", "2", "--json"])
    assert again.exit_code == 0, again.stderr[-2000:]
    cached = json.loads(again.stdout)["judge"]
    assert counting.chats() == before and cached["requests"]["sent"] == 0  # a rerun sends nothing
    assert cached["rows"] == report["rows"] and cached["unscored"] == report["unscored"]
    leaked = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [] and KEY_ENV in (run / "recipe.yaml").read_text()


PAIRWISE_RUBRIC = "Which answer to {prompt} is better, A: {answer_a} or B: {answer_b}? Reply A, B or tie."


def judged(result) -> dict:
    assert result.exit_code == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["judge"]


def test_the_live_pairwise_judge_counts_positions_caches_and_lists_unparsed_rows(live, monkeypatch, tmp_path):
    """say-B always answers "B": every verdict goes to the second position, so the tuned model wins exactly the
    rows where the seeded order showed it second, and the position counts show the bias for what it is."""
    run, counting, url = live
    monkeypatch.setenv(KEY_ENV, SECRET)
    copy = tmp_path / "run"  # the score test's run, its evaluations and cache left as they are
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(CACHE_DIR))
    set_judge(copy, mode="pairwise", model="say-B", rubric=PAIRWISE_RUBRIC)
    before = counting.chats()
    report = judged(runner.invoke(app, ["eval", str(copy), "--json"]))
    rows = report["rows"]
    n, second = len(rows), sum(r["tuned_as"] == "B" for r in rows)
    assert n == 4 and 0 < second < n  # the order is drawn per row
    assert [r["choice"] for r in rows] == ["B"] * n and report["unparsed"] == []
    assert report["position"] == {"A": 0, "B": n, "tie": 0, "A_share": 0.0, "A_share_interval": list(wilson(0, n))}
    preference = report["preference"]
    assert (preference["wins"], preference["losses"], preference["ties"], preference["unrated"]) == (
        second, n - second, 0, 0,
    )  # fmt: skip
    assert preference["win_rate"] == second / n and preference["interval"] == list(wilson(second, n))
    assert report["requests"] == {"sent": n, "cached": 0} and counting.chats() - before == n
    # a rerun: the same seeded order renders the same rubrics, so every verdict is read from the cache
    again = runner.invoke(app, ["eval", str(copy)])
    assert again.exit_code == 0, again.stderr[-2000:]
    assert counting.chats() - before == n and f"requests: 0 sent, {n} from RUN/eval/judge-cache/" in again.stdout
    assert f"position picks: A 0, B {n}, tie 0 (A share 0.00 [0.00, {wilson(0, n)[1]:.2f}]" in again.stdout
    newest = max((copy / "eval").glob("2*/judge.json"))
    assert json.loads(newest.read_text())["rows"] == rows  # the order is the recipe seed's, run after run
    # the tiny run as its own judge: replies that are not A, B or tie are counted unrated and listed by row
    set_judge(copy, model="tiny")
    result = runner.invoke(app, ["eval", str(copy), "--json"])
    report = judged(result)
    unparsed = {u["row"]: u["reply"] for u in report["unparsed"]}
    assert unparsed and report["preference"]["unrated"] == len(unparsed)
    assert {i for i, r in enumerate(report["rows"]) if r["choice"] is None} == set(unparsed)
    decided = report["preference"]
    assert decided["wins"] + decided["losses"] + decided["ties"] + decided["unrated"] == n
    assert all(parse_choice(reply) is None for reply in unparsed.values())
    i = min(unparsed)  # that row's reply is what the server answers the same request
    row = [json.loads(line) for line in (Path(json.loads(result.stdout)["out_dir"]) / "examples.jsonl").open()][i]
    a, b = ("tuned", "base") if report["rows"][i]["tuned_as"] == "A" else ("base", "tuned")
    rubric = render(PAIRWISE_RUBRIC, {"prompt": row["prompt"], "answer_a": row[a], "answer_b": row[b]})
    body = {"model": "tiny", "messages": [{"role": "user", "content": rubric}], "temperature": 0, "max_tokens": 16}
    reply = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}, timeout=60)
    assert reply.json()["choices"][0]["message"]["content"][:200] == unparsed[i]
    leaked = [p for p in copy.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_an_unreachable_judge_stops_the_eval_naming_its_url(live, monkeypatch):
    run, _, url = live
    monkeypatch.setenv(KEY_ENV, SECRET)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    set_judge(run, url=dead)
    try:
        result = runner.invoke(app, ["eval", str(run)])
        assert result.exit_code == 1 and dead in result.stderr, result.stderr[-2000:]
        monkeypatch.delenv(KEY_ENV)
        set_judge(run, url=url)
        unset = runner.invoke(app, ["eval", str(run)])
        assert unset.exit_code == 2 and KEY_ENV in unset.stderr and "not set" in unset.stderr
    finally:
        set_judge(run, url=url)


def test_a_review_sheet_round_trip_through_the_cli(live, tmp_path):
    run, _, _ = live
    written = runner.invoke(app, ["eval", str(run), "--review-sheet", str(tmp_path / "sheet.csv"), "--json"])
    assert written.exit_code == 0, written.stderr[-2000:]
    sheet = json.loads(written.stdout)
    key = json.loads(Path(sheet["key"]).read_text())
    assert Path(sheet["key"]).parent == run / "eval" / "review"
    with (tmp_path / "sheet.csv").open(newline="") as f:
        items = list(csv.DictReader(f))
    assert len(items) == len(key["items"]) >= 2 and set(items[0]) == {
        "sheet",
        "item",
        "prompt",
        "answer_1",
        "answer_2",
        "preferred",
        "comment",
    }
    assert not any("tiny" in (tmp_path / f"sheet.{ext}").read_text() for ext in ("csv", "html"))  # no model names
    for item, k in zip(items, key["items"], strict=True):  # the rater prefers the tuned answer on all but one
        item["preferred"] = str(k["tuned"]) if k["item"] != 1 else "tie"
    with (tmp_path / "sheet.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(items[0]))
        writer.writeheader()
        writer.writerows(items)
    read = runner.invoke(app, ["eval", str(run), "--ratings", str(tmp_path / "sheet.csv")])
    assert read.exit_code == 0, read.stderr[-2000:]
    n = len(items) - 1  # every item but the tie: the tuned answer preferred
    low, _ = wilson(n, n)
    assert "tuned wins" in read.stdout and f"1.00 [{low:.2f}, 1.00]" in read.stdout
    record = json.loads((run / "eval" / "review" / f"{key['sheet']}.ratings.json").read_text())
    assert record["overall"]["wins"] == n and record["overall"]["ties"] == 1 and record["overall"]["losses"] == 0
