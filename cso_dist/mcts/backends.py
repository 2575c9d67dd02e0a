"""Chat LLM backends for the ESC-Pro search: a local transformers model and any OpenAI-compatible
endpoint (a vLLM server on the cluster), both behind a per-call cache on disk.

`chat(messages, max_tokens, temperature) -> str` is thread-safe on every backend: the build runs
many trees in threads. The HF backend gathers concurrent calls into one left-padded `generate`
(batching across trees); the HTTP backend simply runs calls in parallel, with the client's
retries and timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from cso_dist.io import atomic_write_text
from cso_dist.errors import ConfigError, CsoError


class Backend(Protocol):
    name: str  # identifies the model in cache keys

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str: ...


class HFBackend:
    """A local causal LM. Calls from many threads are batched (up to `batch_size`) into one generate()."""

    def __init__(self, path: str, device: str = "", batch_size: int = 16, wait_s: float = 0.02, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        from cso_dist.inputs import default_device  # torch and transformers only for this backend
        from cso_dist.models.tokenizer import load_tokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"mcts.model: '{path}' is not a model folder (no config.json)")
        self.name = f"hf:{p.resolve()}"
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(p)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"mcts.model: the tokenizer in '{path}' has no chat template")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True).to(self.device).eval()
        self.batch_size, self.wait_s, self.seed = batch_size, wait_s, seed
        self._q: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="hf-backend")
        self._worker.start()
        self.batches = 0

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        fut: Future = Future()
        self._q.put((messages, max_tokens, temperature, fut))
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
            groups: dict[tuple, list] = {}  # one generate() per (max_tokens, temperature)
            for it in items:
                groups.setdefault((it[1], it[2]), []).append(it)
            for (max_tokens, temperature), group in groups.items():
                try:
                    texts = self._generate([g[0] for g in group], max_tokens, temperature)
                except Exception as e:  # noqa: BLE001 - every waiting caller gets the error
                    for g in group:
                        g[3].set_exception(e)
                    continue
                for g, text in zip(group, texts):
                    g[3].set_result(text)

    def _generate(self, chats: list[list[dict]], max_tokens: int, temperature: float) -> list[str]:
        import torch

        from cso_dist.eval.generate import generate_texts

        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        kw = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
        if temperature > 0:  # the same prompts sample the same answers, whatever ran before (resume)
            digest = hashlib.sha256(json.dumps([chats, temperature, self.seed]).encode()).hexdigest()
            torch.manual_seed(int(digest[:12], 16))
        self.batches += 1
        return generate_texts(self.model, tok, ids, max_tokens, **kw)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint; the key comes from the environment only."""

    def __init__(
        self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0, retries: int = 3
    ):
        from openai import OpenAI

        if not model:
            raise ConfigError("mcts.model: the served model's name is needed with mcts.backend=openai")
        self.name = f"openai:{base_url}:{model}"
        self.model = model
        self.client = OpenAI(
            base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout_s, max_retries=retries
        )

    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        import openai

        try:
            r = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature
            )
        except openai.APIError as e:  # after the client's own retries (connection, timeout, 429, 5xx)
            raise CsoError(f"mcts: {self.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        return (r.choices[0].message.content or "").strip() if r.choices else ""


class CachedBackend:
    """Every answer stored on disk under a key of (model, messages, max_tokens, temperature, sample):
    a rerun or a resumed build replays it for free. `sample` tells apart deliberate repeats."""

    def __init__(self, inner: Backend, folder: str | Path):
        self.inner, self.name = inner, inner.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.calls = self.hits = 0
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
        return OpenAIBackend(base_url, model, api_key_env, timeout_s, retries)
    raise ConfigError(f"mcts.backend: '{kind}' is not one of hf, openai")
