"""`eval generate --backend openai`: the served-model client (cso_dist.models.served) and evaluation's use of it
(cso_dist.eval.served) against a real HTTP server on loopback that answers /v1/models, /v1/completions and
/v1/chat/completions as vLLM does. The client is the real openai client; errors are one line naming the problem."""

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cso_dist.util.errors import CsoError
from cso_dist.eval.served import open_served, served_client, served_origin, served_texts
from cso_dist.models.served import OpenAIBackend
from conftest import cfg_of

pytestmark = pytest.mark.unit

SECRET = "sk-served-test-0123456789"


def _reply(prompt: str) -> str:
    """What the test server answers to a prompt: a function of the prompt, padded with spaces (stripped)."""
    return f" (Question) reply {hashlib.sha1(prompt.encode()).hexdigest()[:10]} \n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.seen("GET", self.path, None, self.headers)
        if self._fault("models"):
            return
        if self.path != "/v1/models":
            return self._send(404, {"detail": "Not Found"})  # FastAPI's answer to an unknown route
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": f"/models/{name}",
                "parent": None,
                "max_model_len": 4096,
                "permission": [],
            }
            for name in srv.models
        ]
        self._send(200, {"object": "list", "data": data})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rank = srv.seen("POST", self.path, body, self.headers)
        if self._fault("completions"):
            return
        if body.get("model") not in srv.models:
            msg = f"The model `{body.get('model')}` does not exist."
            return self._send(404, {"error": {"message": msg, "type": "NotFoundError", "param": "model", "code": 404}})
        if self.path == "/v1/completions":
            if srv.barrier is not None:  # every request of the batch is in flight at once ...
                srv.barrier.wait(timeout=10)
                time.sleep(0.05 * (srv.barrier.parties - rank % srv.barrier.parties))  # ... and the first ends last
            with srv.lock:
                srv.finished.append(body["prompt"])
            choice = {"index": 0, "text": _reply(body["prompt"]), "logprobs": None, "finish_reason": "stop"}
            return self._answer(body, "text_completion", {**choice, "stop_reason": None, "prompt_logprobs": None})
        if self.path == "/v1/chat/completions":
            message = {"role": "assistant", "content": " I hear you. ", "tool_calls": []}
            return self._answer(body, "chat.completion", {"index": 0, "message": message, "finish_reason": "stop"})
        self._send(404, {"detail": "Not Found"})

    def _fault(self, route: str) -> bool:
        """Answer as server.faults[route] says, if it names a fault: True when it did."""
        kind = self.server.faults.get(route)
        if kind == "500":
            self._send(500, {"error": {"message": "injected failure", "type": "InternalServerError", "code": 500}})
        elif kind == "hang":  # the connection is accepted, no answer ever comes
            self.server.release.wait(30)
        elif kind == "html":
            self._send(200, None, b"<html>welcome to the proxy</html>", "text/html")
        elif kind == "notjson":
            self._send(200, None, b"<html>welcome to the proxy</html>")
        return kind is not None

    def _answer(self, body, kind, choice):
        answer = {"id": "cmpl-1", "object": kind, "created": int(time.time()), "model": body["model"]}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        self._send(200, {**answer, "choices": [choice], "usage": usage})

    def _send(self, code, obj, raw: bytes | None = None, content_type="application/json"):
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)


class Server(ThreadingHTTPServer):
    """A vLLM-like server. `faults[route]`: "500" (an internal error), "hang" (accepts, never answers), "html" or
    "notjson" (200 with a body that is not JSON), for route "models" or "completions"."""

    daemon_threads = True

    def __init__(self, models=("tiny",)):
        super().__init__(("127.0.0.1", 0), Handler)
        self.models = list(models)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict | None]] = []
        self.auth: set[str] = set()
        self.finished: list[str] = []
        self.faults: dict[str, str] = {}
        self.barrier: threading.Barrier | None = None
        self.release = threading.Event()

    def seen(self, method, path, body, headers) -> int:
        with self.lock:
            self.requests.append((method, path, body))
            self.auth.add(headers.get("Authorization", ""))
            return sum(1 for m, p, _ in self.requests if (m, p) == (method, path)) - 1

    def posts(self, path="/v1/completions") -> list[dict]:
        with self.lock:
            return [b for m, p, b in self.requests if m == "POST" and p == path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"


@pytest.fixture
def server():
    srv = Server()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _cfg(url: str, **over):
    base = {
        "eval.backend": "openai",
        "eval.endpoint": url,
        "eval.served_model": "tiny",
        "eval.timeout_s": 5,
        "eval.retries": 0,
        "eval.max_new_tokens": 48,
        "eval.batch_size": 4,
    }
    return cfg_of({k: str(v) for k, v in {**base, **over}.items()})


def _chats(tok, n: int) -> list[list[int]]:
    """Token prompts as local generation sees them: a history rendered with the assistant turn opened."""
    out = []
    for k in range(n):
        chat = [{"role": "system", "content": "You are a supporter."}, {"role": "user", "content": f"Day {k}: sad ."}]
        out.append(list(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]))
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert SECRET not in msg
    return msg


def test_esconv_prompts_arrive_exactly_as_rendered_with_stops_and_settings(server, qwen_tok, esconv_dir, monkeypatch):
    """Real ESConv test turns rendered by the eval pipeline: each arrives as the decoded prompt (special tokens
    included) that re-encodes to the very same ids; the end of turn is sent as stop text and id; greedy unless
    eval.do_sample; the replies come back stripped; the key goes into the Authorization header only."""
    from cso_dist.data.render import make_renderer
    from cso_dist.data.strategies import load_strategy_set
    from cso_dist.eval.prompts import eval_dialogues, eval_turns

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cfg = _cfg(server.url, **{"eval.max_dialogues": 1, "data.max_length": 512})
    turns = eval_turns(
        eval_dialogues(cfg, "test"), make_renderer(qwen_tok, "auto"), load_strategy_set("esconv"), 512, 48
    )
    assert len(turns) >= 3
    prompts = [t.prompt for t in turns]
    client = open_served(cfg)
    texts = served_texts(cfg, qwen_tok, prompts, client)
    sent = server.posts()
    by_prompt = {b["prompt"]: b for b in sent}
    assert len(sent) == len(prompts)
    for ids, text in zip(prompts, texts):
        rendered = qwen_tok.decode(ids, skip_special_tokens=False)
        body = by_prompt[rendered]
        assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
        assert (
            qwen_tok(body["prompt"], add_special_tokens=False)["input_ids"] == ids
        )  # the tokens local generation sees
        assert body["model"] == "tiny" and body["max_tokens"] == 48 and body["temperature"] == 0.0
        assert body["stop"] == ["<|im_end|>"] and body["stop_token_ids"] == [
            qwen_tok.convert_tokens_to_ids("<|im_end|>")
        ]
        assert body["add_special_tokens"] is False and "top_p" not in body and "seed" not in body
        assert text == _reply(rendered).strip()
    assert server.auth == {f"Bearer {SECRET}"}

    sampled = _cfg(server.url, **{"eval.do_sample": "true", "eval.temperature": 0.7, "eval.top_p": 0.9, "run.seed": 7})
    served_texts(sampled, qwen_tok, prompts[:1], client)
    body = server.posts()[-1]
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 7)


def test_concurrent_requests_answered_out_of_order_come_back_in_input_order(server, qwen_tok):
    """eval.batch_size requests in flight at once (the server holds each until all have arrived: a client that
    sent one at a time would time out) and answered last-first; the texts are in input order."""
    cfg = _cfg(server.url, **{"eval.batch_size": 6})
    prompts = _chats(qwen_tok, 6)
    server.barrier = threading.Barrier(6)
    texts = served_texts(cfg, qwen_tok, prompts, served_client(cfg))
    rendered = [qwen_tok.decode(p, skip_special_tokens=False) for p in prompts]
    arrived = [b["prompt"] for b in server.posts()]
    assert server.finished == arrived[::-1] and server.finished != rendered  # answered out of order
    assert texts == [_reply(r).strip() for r in rendered]


def test_origin_records_the_server_the_model_and_the_generation_settings(server):
    """Not the endpoint: the same model served from another node (a new job) goes on with the same PRED file."""
    cfg = _cfg(server.url)
    client = open_served(cfg)
    assert served_origin(cfg, client) == {
        "backend": "openai",
        "served_model": "tiny",
        "served_root": "/models/tiny",
        "generation": {"max_new_tokens": 48, "do_sample": False},
    }
    sampled = _cfg(server.url, **{"eval.do_sample": "true", "run.seed": 3})
    assert served_origin(sampled)["generation"] == {
        "max_new_tokens": 48,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
    }


def test_a_model_the_server_does_not_serve_is_one_line_naming_both(server):
    server.models = ["Qwen/Qwen2.5-72B-Instruct", "other"]
    with pytest.raises(CsoError) as e:
        open_served(_cfg(server.url, **{"eval.served_model": "qwen-72b"}))
    msg = _one_line(e)
    assert "eval.served_model: 'qwen-72b' is not served" in msg and server.url in msg
    assert "'Qwen/Qwen2.5-72B-Instruct', 'other'" in msg


def test_an_http_error_is_one_line_after_the_retries(server, qwen_tok):
    server.faults["completions"] = "500"
    cfg = _cfg(server.url, **{"eval.retries": 1})
    with pytest.raises(CsoError) as e:
        served_texts(cfg, qwen_tok, _chats(qwen_tok, 1), open_served(cfg))
    msg = _one_line(e)
    assert msg.startswith(f"eval.endpoint {server.url} (model 'tiny'): HTTP 500") and "injected failure" in msg, msg
    assert len(server.posts()) == 2  # the first try and one retry
    # an endpoint that is not the API's root (no /v1): /models is not found there
    with pytest.raises(CsoError) as e:
        open_served(_cfg(server.url.removesuffix("/v1")))
    assert "HTTP 404" in _one_line(e)


def test_a_server_that_never_answers_times_out_in_one_line(server, qwen_tok):
    server.faults["models"] = "hang"
    t0 = time.monotonic()
    with pytest.raises(CsoError) as e:
        open_served(_cfg(server.url, **{"eval.timeout_s": 0.5}))
    assert time.monotonic() - t0 < 3
    msg = _one_line(e)
    assert server.url in msg and "no answer within the timeout (0.5s per call, eval.timeout_s; 0 retries)" in msg, msg

    del server.faults["models"]
    server.faults["completions"] = "hang"
    cfg = _cfg(server.url, **{"eval.timeout_s": 0.5, "eval.retries": 1})
    with pytest.raises(CsoError) as e:
        served_texts(cfg, qwen_tok, _chats(qwen_tok, 2), open_served(cfg))
    assert "no answer within the timeout" in _one_line(e)
    assert len(server.posts()) == 4  # both prompts, each tried twice


@pytest.mark.parametrize("kind", ["notjson", "html"])
def test_a_body_that_is_not_json_is_one_line(server, qwen_tok, kind):
    server.faults["models"] = kind
    with pytest.raises(CsoError) as e:
        open_served(_cfg(server.url))
    msg = _one_line(e)
    assert server.url in msg and "not JSON" in msg, msg
    del server.faults["models"]
    server.faults["completions"] = kind
    cfg = _cfg(server.url)
    with pytest.raises(CsoError) as e:
        served_texts(cfg, qwen_tok, _chats(qwen_tok, 1), open_served(cfg))
    assert "not JSON" in _one_line(e)


def test_an_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(CsoError) as e:
        open_served(_cfg(url))
    msg = _one_line(e)
    assert msg.startswith(f"eval.endpoint {url} (model 'tiny'): cannot connect"), msg


def test_the_mcts_roles_chat_through_the_same_client(server):
    """The MCTS builder's backend is this client (mcts.backends re-exports it): chat completions still work."""
    from cso_dist.mcts import backends

    assert backends.OpenAIBackend is OpenAIBackend
    b = backends.make_backend("openai", "tiny", server.url, timeout_s=5, retries=0)
    assert b.chat([{"role": "user", "content": "I lost my job."}], 16, 0.0) == "I hear you."
    assert server.posts("/v1/chat/completions")[0]["messages"][0]["content"] == "I lost my job."
    with pytest.raises(CsoError) as e:
        backends.make_backend("openai", "nope", server.url, timeout_s=5, retries=0).chat([], 4, 0.0)
    assert _one_line(e).startswith(f"mcts.base_url {server.url} (model 'nope'): HTTP 404")


def test_eval_generate_through_a_server_writes_the_pred_file_without_loading_weights(
    server, qwen_tok, esconv_dir, tmp_path, capsys
):
    """`eval generate --backend openai` end to end on real ESConv test turns: the model folder holds a tokenizer
    and no weights at all (nothing is loaded in the job); every turn's row carries the server's reply, the origin
    names the server, a rerun has nothing left to do, and local rows into the same file are refused."""
    from cso_dist.eval.generate import run_generate

    folder = tmp_path / "tokenizer-only"
    qwen_tok.save_pretrained(folder)
    cfg = _cfg(server.url, **{"eval.max_dialogues": 2, "data.max_length": 512, "model.path": folder})
    out = tmp_path / "pred.jsonl"
    run_generate(cfg, "test", out, "generate", progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    prompts = [b["prompt"] for b in server.posts()]  # one request per turn (two turns may share a history)
    assert len(rows) == len(prompts) >= 5 and len({r["id"] for r in rows}) == len(rows)
    assert sorted(r["pred_raw"] for r in rows) == sorted(_reply(p).strip() for p in prompts)
    assert all(r["pred_strategy"] == "Question" and r["mode"] == "generate" for r in rows)
    origin = json.loads(out.with_name(out.name + ".origin.json").read_text())
    assert origin["backend"] == "openai" and origin["served_model"] == "tiny" and "model_key" not in origin
    run_generate(cfg, "test", out, "generate", progress=False)
    assert "0 turns in" in capsys.readouterr().out and len(server.posts()) == len(prompts)  # nothing asked again
    shorter = _cfg(
        server.url, **{"eval.max_dialogues": 2, "data.max_length": 512, "model.path": folder, "eval.max_new_tokens": 8}
    )
    with pytest.raises(CsoError, match="came from generation"):  # other settings into the same file
        run_generate(shorter, "test", out, "generate", progress=False)
    local = cfg_of({"model.path": str(folder), "eval.max_dialogues": "2", "data.max_length": "512"})
    with pytest.raises(CsoError, match="no .*weight files"):  # generating here needs the weights
        run_generate(local, "test", out, "generate", progress=False)
