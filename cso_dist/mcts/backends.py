"""Chat LLM backends for the ESC-Pro search: a local transformers model and any OpenAI-compatible
endpoint (a vLLM server on the cluster; its client, OpenAIBackend, lives in cso_dist.models.served, shared with
`eval generate --backend openai`), both behind a per-call cache on disk.

`chat(messages, max_tokens, temperature) -> str` is thread-safe on every backend: the build runs
many trees in threads. The HF backend gathers concurrent calls into one left-padded `generate`
(batching across trees); the HTTP backend simply runs calls in parallel, with the client's
retries and timeout.

`next_token_probs(probes, top_k) -> list[dict[str, float]] | None` reads, for each probe
(messages, prefix), the model's distribution of the next token after the assistant's answer has
begun with `prefix`: {decoded token text: probability} for the `top_k` most likely tokens. The
roles read choice answers (scores, ratings) from it. None: this backend cannot (a server that
returns no log-probs, or refuses a prefilled assistant turn); the roles then parse text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from cso_dist.util.io import atomic_write_text
from cso_dist.util.errors import ConfigError
from cso_dist.models.served import TOP_K, OpenAIBackend, Probe  # the served-model client, shared with eval


class Backend(Protocol):
    name: str  # identifies the model in cache keys

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str: ...

    def next_token_probs(self, probes: list[Probe], top_k: int = TOP_K) -> list[dict[str, float]] | None: ...


class HFBackend:
    """A local causal LM. Calls from many threads are batched (up to `batch_size`) into one generate()."""

    def __init__(
        self,
        path: str,
        device: str = "",
        batch_size: int = 16,
        wait_s: float = 0.02,
        seed: int = 0,
        cache_prompts: int = 8,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from cso_dist.scorer.device import cache_kw, default_device  # torch and transformers only for this backend
        from cso_dist.models import hub
        from cso_dist.models.tokenizer import load_tokenizer

        p = hub.ensure(str(path), None, 0, 0, key="mcts.model")  # a Hub id: its snapshot (downloaded once)
        if not (p / "config.json").is_file():
            raise ConfigError(f"mcts.model: '{path}' is not a model folder (no config.json)")
        self.folder, self.name = p, f"hf:{p.resolve()}"
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(p)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"mcts.model: the tokenizer in '{path}' has no chat template")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True).to(self.device).eval()
        self.batch_size, self.wait_s, self.seed = batch_size, wait_s, seed
        self._cache_kw = cache_kw(self.model)
        self._caches: dict[tuple, object] = {}  # prompt token ids -> key/value cache (worker thread only)
        self.cache_prompts = cache_prompts
        self._q: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="hf-backend")
        self._worker.start()
        self.batches = 0

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        fut: Future = Future()
        self._q.put((messages, max_tokens, temperature, fut))
        return fut.result()

    def next_token_probs(self, probes: list[Probe], top_k: int = TOP_K) -> list[dict[str, float]]:
        fut: Future = Future()  # one queue item: a role's probes share their prompt (one batch on its cache)
        self._q.put((probes, -1, float(top_k), fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            items, deadline = [first], time.monotonic() + self.wait_s
            while len(items) < self.batch_size:
                try:
                    items.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list] = {}  # one generate() per (max_tokens, temperature); max_tokens -1: probes
            for it in items:
                groups.setdefault((it[1], it[2]), []).append(it)
            for (max_tokens, temperature), group in groups.items():
                try:
                    if max_tokens < 0:
                        got = self._probe([p for g in group for p in g[0]], int(temperature))
                        texts, k = [], 0
                        for g in group:
                            texts.append(got[k : k + len(g[0])])
                            k += len(g[0])
                    else:
                        texts = self._generate([g[0] for g in group], max_tokens, temperature)
                except Exception as e:  # noqa: BLE001 - every waiting caller gets the error
                    for g in group:
                        g[3].set_exception(e)
                    continue
                for g, text in zip(group, texts):
                    g[3].set_result(text)

    def _generate(self, chats: list[list[dict]], max_tokens: int, temperature: float) -> list[str]:
        import torch

        from cso_dist.scorer.generate import generate_texts

        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        kw = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
        if temperature > 0:  # the same prompts sample the same answers, whatever ran before (resume)
            digest = hashlib.sha256(json.dumps([chats, temperature, self.seed]).encode()).hexdigest()
            torch.manual_seed(int(digest[:12], 16))
        self.batches += 1
        return generate_texts(self.model, tok, ids, max_tokens, **kw)

    def _prompt_cache(self, ids: list[int]):
        """The key/value cache of a prompt; the last `cache_prompts` are kept (a scorer asks 2-3 rounds)."""
        import torch

        key = tuple(ids)
        if key in self._caches:
            self._caches[key] = self._caches.pop(key)  # most recently used last
            return self._caches[key]
        from cso_dist.scorer.device import cache_of, feed

        with torch.no_grad():
            first = feed(self.model, self.model, input_ids=torch.tensor([ids]), use_cache=True)
        self._caches[key] = cache_of(first)
        while len(self._caches) > self.cache_prompts:
            self._caches.pop(next(iter(self._caches)))
        return self._caches[key]

    def _probe(self, probes: list[Probe], top_k: int) -> list[dict[str, float]]:
        """Top-k next-token probabilities after each prompt + prefix. Probes of one chat share its prompt:
        the tokens all of them start with run once, and the short rest of each runs as one batch on a copy
        of that key/value cache (right-padded: a row's last real token sees nothing after it)."""
        import torch

        from cso_dist.scorer.device import feed, to_model

        tok = self.tokenizer
        groups: dict[str, list[int]] = {}
        for k, (m, _) in enumerate(probes):
            groups.setdefault(json.dumps(m, sort_keys=True), []).append(k)
        out: list[dict[str, float]] = [{} for _ in probes]
        for rows in groups.values():
            text = tok.apply_chat_template(probes[rows[0]][0], tokenize=False, add_generation_prompt=True)
            ids = [tok(text + probes[k][1], add_special_tokens=False)["input_ids"] for k in rows]
            head = tok(text, add_special_tokens=False)["input_ids"]
            if all(len(x) > len(head) and x[: len(head)] == head for x in ids):
                n = len(head)  # the prompt itself: its cache serves this role's next rounds too
            else:  # a token merged across the prompt's end: the longest common start
                n, limit = 0, min(len(x) for x in ids) - 1  # every row keeps >= 1 token of its own
                while n < limit and all(x[n] == ids[0][n] for x in ids):
                    n += 1
            rest = [x[n:] for x in ids]
            width = max(map(len, rest))
            x = torch.zeros((len(rest), width), dtype=torch.long)
            mask = torch.zeros((len(rest), n + width), dtype=torch.long)
            for r, row in enumerate(rest):
                x[r, : len(row)] = torch.tensor(row)
                mask[r, : n + len(row)] = 1
            pos = torch.arange(n, n + width).expand(len(rest), -1)
            self.batches += 1
            with torch.no_grad():
                kv = {}
                if n:
                    cache = copy.deepcopy(self._prompt_cache(ids[0][:n]))
                    cache.batch_repeat_interleave(len(rest))
                    kv = {self._cache_kw: cache, "use_cache": True}
                logits = feed(self.model, self.model, input_ids=x, attention_mask=mask, position_ids=pos, **kv).logits
            batch, ends = to_model(self.model, torch.arange(len(rest)), torch.tensor([len(r) - 1 for r in rest]))
            last = logits[batch, ends]  # each row's last real token
            top = torch.softmax(last.float(), -1).topk(top_k)
            for k, probs, idx in zip(rows, top.values.tolist(), top.indices.tolist()):
                d = out[k]
                for p, i in zip(probs, idx):  # two ids may decode alike
                    t = tok.decode([i])
                    d[t] = d.get(t, 0.0) + p
        return out


class CachedBackend:
    """Every answer stored on disk under a key of (model, messages, max_tokens, temperature, sample):
    a rerun or a resumed build replays it for free. `sample` tells apart deliberate repeats."""

    def __init__(self, inner: Backend, folder: str | Path):
        self.inner, self.name = inner, inner.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.calls = self.hits = self.probes = 0  # probes: the next-token calls among the calls
        self._lock = threading.Lock()

    def _path(self, messages: list[dict], max_tokens: int, temperature: float, sample: int) -> Path:
        key = json.dumps([self.name, messages, max_tokens, temperature, sample], sort_keys=True, ensure_ascii=False)
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / h[:2] / f"{h}.json"

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, sample: int = 0) -> str:
        path = self._path(messages, max_tokens, temperature, sample)
        if path.is_file():
            try:
                text = json.loads(path.read_text(encoding="utf-8"))["text"]
                with self._lock:
                    self.hits += 1
                return text
            except (json.JSONDecodeError, KeyError):
                pass  # a torn entry: ask again
        text = self.inner.chat(messages, max_tokens, temperature)
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps({"text": text, "messages": messages}, ensure_ascii=False))
        with self._lock:
            self.calls += 1
        return text

    def next_token_probs(self, probes: list[Probe], top_k: int = TOP_K) -> list[dict[str, float]] | None:
        """Cached per probe like chat(); None (never cached) when the inner backend gives no log-probs."""
        ask = getattr(self.inner, "next_token_probs", None)
        if ask is None:
            return None
        paths = [self._path([*m, {"role": "assistant", "content": p}], -1, float(top_k), 0) for m, p in probes]
        out: list[dict[str, float] | None] = [None] * len(probes)
        for k, path in enumerate(paths):
            try:
                out[k] = json.loads(path.read_text(encoding="utf-8"))["probs"] if path.is_file() else None
            except (json.JSONDecodeError, KeyError):
                pass  # a torn entry: ask again
        todo = [k for k, d in enumerate(out) if d is None]
        with self._lock:
            self.hits += len(probes) - len(todo)
        if todo:
            got = ask([probes[k] for k in todo], top_k)
            if got is None:
                return None
            for k, d in zip(todo, got):
                paths[k].parent.mkdir(exist_ok=True)
                atomic_write_text(paths[k], json.dumps({"probs": d, "probe": probes[k]}, ensure_ascii=False))
                out[k] = d
            with self._lock:
                self.calls += len(todo)
                self.probes += len(todo)
        return out


def make_backend(
    kind: str,
    model: str,
    base_url: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    timeout_s: float = 120.0,
    retries: int = 3,
    batch_size: int = 16,
    seed: int = 0,
) -> Backend:
    if kind == "hf":
        return HFBackend(model, batch_size=batch_size, seed=seed)
    if kind == "openai":
        return OpenAIBackend(
            base_url,
            model,
            api_key_env,
            timeout_s,
            retries,
            url_key="mcts.base_url",
            model_key="mcts.model",
            timeout_key="mcts.timeout_s",
        )
    raise ConfigError(f"mcts.backend: '{kind}' is not one of hf, openai")
