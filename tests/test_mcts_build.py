"""The ESC-Pro builder end to end: LLM roles (parsing, retries, cache), a real build with a tiny local
HF model on ESConv seeds (read back by `data build --from escpro`), kill + resume, drawing, and the
OpenAI-compatible backend against a real HTTP server on loopback."""

import json
import math
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cso_dist.data.strategies import load_strategy_set
from cso_dist.mcts.backends import CachedBackend, HFBackend
from cso_dist.mcts.llm_roles import LLMRoles, choice_probs, clean_reply, expected, load_prompts, parse_scores
from cso_dist.mcts.roles import JUDGE_ASPECTS, SEEKER, SUPPORTER, Turn
from conftest import MCTS_SMALL as SMALL
from conftest import REPO, run_cli, tiny_run_data


@pytest.fixture(scope="module")
def world(tmp_path_factory, esconv_dir):
    root = tmp_path_factory.mktemp("mcts")
    model = tiny_run_data(root, esconv_dir, n_train=1, n_valid=1)
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join((esconv_dir / "test.jsonl").read_text().splitlines(keepends=True)[:2]))
    return root, model, seeds


def test_parse_scores_and_clean_reply_are_tolerant():
    names = list(load_strategy_set("esconv").names)
    got = parse_scores(
        "- **Question**: 7\nRestatement or Paraphrasing - 5/10\nreflection of feelings = 8.5\n"
        "Affirmation and Reassurance: 12\nInformation: none",
        names,
    )
    assert got["Question"] == 7 and got["Restatement or Paraphrasing"] == 5 and got["Reflection of feelings"] == 8.5
    assert got["Affirmation and Reassurance"] == 10  # clamped
    assert got["Information"] is None and got["Others"] is None
    assert parse_scores(
        '{"Empathy": 3, "Information": 2, "Humanoid": 9, "Strategy": 1.5}', list(JUDGE_ASPECTS), 0, 4
    ) == {"Empathy": 3, "Information": 2, "Humanoid": 4, "Strategy": 1.5}
    assert clean_reply('Supporter: (Question) "How are you feeling?"', names) == "How are you feeling?"
    assert clean_reply("(not a strategy) kept", names) == "(not a strategy) kept"


class Scripted:
    """A chat backend answering from a list per role (the last answer repeats)."""

    name = "scripted"

    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.seen = answers, []

    def chat(self, messages, max_tokens, temperature):
        prompt = messages[-1]["content"]
        role = next(
            r
            for r, key in (
                ("scorer", "Rate how helpful"),
                ("judge", "Rate the reply"),
                ("seeker", "role-playing"),
                ("supporter", "next reply"),
            )
            if key in prompt
        )
        self.seen.append((role, temperature))
        k = sum(1 for r, _ in self.seen if r == role) - 1
        return self.answers[role][min(k, len(self.answers[role]) - 1)]


def test_llm_roles_retry_malformed_answers_then_count_them_missing(tmp_path):
    sset = load_strategy_set("esconv")
    backend = Scripted(
        {
            "scorer": ["I think questions are good", "\n".join(f"{n}: {i}" for i, n in enumerate(sset.names))],
            "judge": ["great reply!"],
            "seeker": ["Thanks, that helps a lot. [END]"],
            "supporter": ["", "Supporter: (Question) How long has this been going on?"],
        }
    )
    cached = CachedBackend(backend, tmp_path / "cache")
    roles = LLMRoles(cached, sset, load_prompts(), "sad about work", "job crisis")
    hist = [Turn(SEEKER, "I lost my job.")]
    scores = roles.score_strategies(hist)
    assert scores == {n: float(i) for i, n in enumerate(sset.names)}
    assert roles.stats["retries_scorer"] == 1 and roles.stats["missing_scores"] == 0
    assert roles.stats["text_fallback_scorer"] == 1  # this backend gives no log-probs: text is parsed
    assert [t for r, t in backend.seen if r == "scorer"] == [0.0, 0.7]  # a greedy retry would repeat itself
    assert roles.supporter(hist, "Question") == "How long has this been going on?"
    assert roles.seeker(hist + [Turn(SUPPORTER, "x", "Question")]) == ("Thanks, that helps a lot.", True)
    ratings = roles.judge(hist, Turn(SUPPORTER, "How long?", "Question"))
    assert ratings == {a: None for a in JUDGE_ASPECTS}
    assert roles.stats["missing_ratings"] == 4 and roles.stats["retries_judge"] == 2
    # every answer is on disk: the same questions again cost no call
    n_calls = len(backend.seen)
    again = LLMRoles(cached, sset, load_prompts(), "sad about work", "job crisis")
    assert again.score_strategies(hist) == scores and len(backend.seen) == n_calls
    assert cached.hits >= 2


class NextTokens:
    """A backend answering next-token probabilities from a table keyed by the assistant prefix."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def next_token_probs(self, probes, top_k=20):
        self.asked += [prefix for _, prefix in probes]
        return [self.table.get(prefix, {}) for _, prefix in probes]


def test_choice_probs_follow_answers_over_several_tokens():
    """ " " then "7", "1" then "0" (= 10) or a line end (= 1); "15", "x" and "1." are no allowed answer."""
    opts = [str(i) for i in range(11)]
    table = {
        "Q:": {" ": 0.5, " 1": 0.3, "7": 0.1, "x": 0.1},
        "Q: ": {"7": 0.6, "10": 0.4},
        "Q: 1": {"0": 0.5, "\n": 0.2, "5": 0.25, ".": 0.05},
        "E:": {" 3": 0.9, " 4": 0.1},
    }
    b = NextTokens(table)
    q, e = choice_probs(b, [], ["Q:", "E:"], opts)
    assert b.asked == ["Q:", "E:", "Q: ", "Q: 1"]  # one round per depth, only where an answer may go on
    raw = {"7": 0.5 * 0.6 + 0.1, "10": 0.5 * 0.4 + 0.3 * 0.5, "1": 0.3 * 0.2}
    mass = sum(raw.values())
    assert q["mass"] == pytest.approx(mass)
    assert {o: q[o] for o in raw} == pytest.approx({o: v / mass for o, v in raw.items()})
    assert expected(q, opts) == pytest.approx(sum(int(o) * v for o, v in raw.items()) / mass)
    assert expected(e, opts) == pytest.approx(3.1) and e["mass"] == pytest.approx(1.0)
    assert expected(choice_probs(NextTokens({}), [], ["Q:"], opts)[0], opts) is None  # no mass: missing


def test_hf_backend_next_token_probs_are_exact_and_batched(world, tmp_path):
    """Probes of different lengths in one left-padded forward equal each alone and the model's own softmax;
    scores read from them are cached like chat answers."""
    import torch

    backend = HFBackend(str(world[1]), batch_size=8, wait_s=0.5)
    msgs = [{"role": "user", "content": "Rate it."}]
    probes = [(msgs, "Empathy:"), (msgs, "Restatement or Paraphrasing: 1")]
    together = backend.next_token_probs(probes, 50)
    assert backend.batches == 1
    alone = [backend.next_token_probs([p], 50)[0] for p in probes]
    tok, model = backend.tokenizer, backend.model
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Empathy:")["input_ids"]
    with torch.no_grad():
        ref = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = ref.topk(50)
    want = {}
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        want[tok.decode([i])] = want.get(tok.decode([i]), 0.0) + v
    for a, b in zip(together, alone):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-5 for t in a)
    assert alone[0].keys() == want.keys() and all(abs(alone[0][t] - want[t]) < 1e-5 for t in want)
    # the whole vocabulary as top-k: a random model's digits are found, and the option's share is exact
    vocab = len(tok)
    cached = CachedBackend(backend, tmp_path / "cache")
    opts = [str(i) for i in range(5)]
    dist = choice_probs(cached, msgs, ["Empathy:"], opts, top_k=vocab)[0]
    assert 0 < dist["mass"] < 1 and sum(dist[o] for o in opts) == pytest.approx(1.0)
    calls = cached.calls
    assert choice_probs(cached, msgs, ["Empathy:"], opts, top_k=vocab)[0] == dist and cached.calls == calls


def _build(world, out: Path, *extra, model=None, seeds=None, check=True, **popen):
    root, model0, seeds0 = world
    model, seeds = model or model0, seeds or seeds0
    args = [
        sys.executable,
        "-m",
        "cso_dist.cli",
        "mcts",
        "build",
        "--seeds",
        str(seeds),
        "--backend",
        "hf",
        "--model",
        str(model),
        "--out",
        str(out),
        *SMALL,
        *map(str, extra),
    ]
    if popen:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_hf_build_on_esconv_seeds_reads_back_reruns_free_and_resumes_after_kill(world, tmp_path):
    out = tmp_path / "full" / "ESC-Pro.json"
    t0 = time.time()
    first = _build(world, out)
    wall = time.time() - t0
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    records = json.loads(out.read_text())
    assert report["seeds"] == 2 and report["records"] == len(records) >= 2  # at least each gold path
    assert report["llm_calls_made"] > 0 and report["llm_calls_per_tree"] > 0
    assert {r["seed"] for r in records} == {"seeds-0", "seeds-1"}
    assert any(m.get("negative") for r in records for m in r["messages"]), "siblings became negatives"
    print(
        f"hf build: {wall:.1f} s, {report['llm_calls_per_tree']:.0f} LLM calls and "
        f"{report['wall_s_per_tree']:.1f} s per tree"
    )
    assert "LLM calls" in first.stdout and "per seed dialogue" in first.stdout
    back = run_cli("data", "build", "--from", "escpro", "--input", out, "--out", tmp_path / "back.jsonl", check=True)
    assert "wrote 2 preference dialogues" in back.stdout and "strategy set: esconv" in back.stdout

    again = _build(world, out)  # a rerun: every tree is done, nothing is asked
    assert "0 made" in again.stdout and out.read_text() == json.dumps(records, ensure_ascii=False, indent=1)
    # the same --out with another model, or a seeds file of the same name holding other dialogues: refused
    import shutil

    other_model = tmp_path / "other-model"
    shutil.copytree(world[1], other_model)
    other = _build(world, out, model=other_model, check=False)
    assert other.returncode != 0 and "was built by" in other.stderr and str(other_model) in other.stderr, other.stderr
    elsewhere = tmp_path / "elsewhere" / world[2].name
    elsewhere.parent.mkdir()
    esconv_test = (world[2].parent / "seeds.jsonl").read_text().splitlines(keepends=True)
    elsewhere.write_text("".join(reversed(esconv_test)))  # the same name, the dialogues swapped
    swapped = _build(world, out, seeds=elsewhere, check=False)
    assert swapped.returncode != 0 and "another seed dialogue" in swapped.stderr, swapped.stderr
    for proc in (other, swapped):  # one line (after the model's loading bars)
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("cso-dist: error:")
    assert out.read_text() == json.dumps(records, ensure_ascii=False, indent=1)

    killed = tmp_path / "killed" / "ESC-Pro.json"
    proc = _build(world, killed, popen=True)
    trees = killed.with_name(killed.name + ".work") / "trees"
    deadline = time.time() + 120
    while time.time() < deadline and not list(trees.glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "killed before the end"
    partial = [json.loads(p.read_text()) for p in trees.glob("*.json")]
    assert partial and not all(s["done"] for s in partial)
    _build(world, killed)
    assert killed.read_text() == out.read_text(), "a resumed build ends like an uninterrupted one"

    png = tmp_path / "tree.png"
    run_cli("mcts", "draw", out.with_name(out.name + ".work") / "trees" / "seeds-0.json", "--out", png, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_seed_file_gives_one_line_naming_file_record_field(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {"dialog": [{"speaker": "usr", "text": "hi"}, {"speaker": "sys", "text": "hello", "strategy": "Hugging"}]}
        )
        + "\n"
    )
    proc = run_cli("mcts", "build", "--seeds", bad, "--model", world[1], "--out", tmp_path / "o.json")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and str(bad) in line and "line 1" in line and "dialog[1].strategy" in line


class ChatServer(ThreadingHTTPServer):
    """A minimal OpenAI-style chat-completions endpoint over a tiny local model, with injected faults:
    the first request fails with HTTP 500, the second answers only after the client's timeout."""

    daemon_threads = True

    def __init__(self, model_dir):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.backend = HFBackend(str(model_dir), batch_size=4)
        self.requests, self.auth, self.lock = 0, set(), threading.Lock()
        self.logprobs, self.probes = True, 0  # like vLLM: a prefilled assistant turn is continued


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.requests += 1
            k = srv.requests
            srv.auth.add(self.headers.get("Authorization", ""))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/chat/completions"):
            return self._send(404, {"error": {"message": "not found"}})
        if k == 1:
            return self._send(500, {"error": {"message": "injected failure"}})
        if k == 2:
            time.sleep(2.5)
        if body.get("logprobs"):
            if not (srv.logprobs and body.get("continue_final_message")):
                return self._send(400, {"error": {"message": "continue_final_message is not supported"}})
            return self._probe(body, k)
        text = srv.backend.chat(body["messages"], int(body.get("max_tokens") or 16), float(body.get("temperature", 0)))
        self._completion(body, k, {"finish_reason": "stop", "message": {"role": "assistant", "content": text}})

    def _completion(self, body, k, choice):
        self._send(
            200,
            {
                "id": f"c{k}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, **choice}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )

    def _probe(self, body, k):
        *messages, prefix = body["messages"]
        probs = self.server.backend.next_token_probs([(messages, prefix["content"])], int(body["top_logprobs"]))[0]
        with self.server.lock:
            self.server.probes += 1
        top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs.items()]
        best = max(top, key=lambda t: t["logprob"])
        message = {"role": "assistant", "content": best["token"]}
        logprobs = {"content": [{**best, "top_logprobs": top}]}
        self._completion(body, k, {"finish_reason": "length", "message": message, "logprobs": logprobs})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) and retried


@pytest.mark.slow
def test_openai_backend_against_a_loopback_server_retries_caches_and_keeps_the_key_secret(world, tmp_path):
    root, model, seeds = world
    server = ChatServer(model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "sk-test-secret-0123456789"
    out = tmp_path / "http" / "ESC-Pro.json"
    args = [
        "mcts",
        "build",
        "--seeds",
        seeds,
        "--backend",
        "openai",
        "--model",
        "tiny",
        "--base-url",
        f"http://127.0.0.1:{server.server_port}/v1",
        "--out",
        out,
        "--max-seeds",
        "1",
        *SMALL,
        "--mcts.timeout_s",
        "1.5",
        "--mcts.retries",
        "3",
    ]
    try:
        proc = run_cli(*args, env={"OPENAI_API_KEY": secret}, check=True)
        served = server.requests
        report = json.loads(out.with_name(out.name + ".report.json").read_text())
        assert report["llm_calls_made"] == served - 2  # the failed and the timed-out request were retried
        assert server.probes > 0 and report["parse"]["scorer"]["from_logprobs"] == 1.0
        assert report["parse"]["judge"]["from_logprobs"] == 1.0
        assert server.auth == {f"Bearer {secret}"}
        records = json.loads(out.read_text())
        assert len(records) >= 1 and records[0]["seed"] == "seeds-0"
        run_cli("data", "build", "--from", "escpro", "--input", out, "--out", tmp_path / "back.jsonl", check=True)
        rerun = run_cli(*args, env={"OPENAI_API_KEY": secret}, check=True)
        assert server.requests == served and "0 made" in rerun.stdout  # the cache answers everything
        for p in [*out.parent.rglob("*")]:
            if p.is_file():
                assert secret not in p.read_text(errors="replace"), f"{p} holds the API key"
        assert secret not in proc.stdout + proc.stderr
        # a server that refuses a prefilled assistant turn: no log-probs, the roles parse text
        from cso_dist.mcts.backends import OpenAIBackend

        server.logprobs = False
        plain = OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1", "tiny")
        assert plain.next_token_probs([([{"role": "user", "content": "Rate it."}], "Empathy:")]) is None
        assert plain.logprobs is False and plain.next_token_probs([([], "x")]) is None  # not asked again
    finally:
        server.shutdown()


def test_hf_backend_batches_calls_from_many_threads(world):
    """Calls from concurrent trees go into one left-padded generate(); greedy answers equal lone calls."""
    from concurrent.futures import ThreadPoolExecutor

    backend = HFBackend(str(world[1]), batch_size=8, wait_s=0.5)
    chats = [[{"role": "user", "content": "I feel " + "very " * k + "sad today."}] for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: backend.chat(c, 8, 0.0), chats))
    assert backend.batches == 1
    alone = [backend.chat(c, 8, 0.0) for c in chats]
    assert backend.batches == 5 and together == alone
