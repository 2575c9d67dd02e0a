"""The client of a model served over HTTP by an OpenAI-compatible server (vLLM, SGLang): one home for the MCTS
builder's roles (`chat`, `next_token_probs`) and for `eval generate --backend openai` (`check_model`, `complete`).

The key comes from the environment only (the variable named by `api_key_env`; never written anywhere); every HTTP
call has the client's timeout (`timeout_s`) and retries (`retries`: connection errors, timeouts, 408/409/429/5xx).
What goes wrong is one line (CsoError) naming the endpoint, the served model and the problem.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from cso_dist.util.errors import ConfigError, CsoError

Probe = tuple[list[dict], str]  # (chat messages, the beginning of the assistant's answer)
TOP_K = 20  # the most an OpenAI-compatible server returns (top_logprobs)


def _first_line(e: BaseException, width: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:width] if text else "no message"


class OpenAIBackend:
    """Any OpenAI-compatible endpoint; the key comes from the environment only. `url_key` and `model_key` are the
    config keys that named the endpoint and the model: errors name them."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        retries: int = 3,
        url_key: str = "base_url",
        model_key: str = "model",
        timeout_key: str = "timeout_s",
    ):
        from openai import OpenAI

        if not model:
            raise ConfigError(f"{model_key}: the served model's name is needed with an OpenAI-compatible endpoint")
        self.name = f"openai:{base_url}:{model}"  # identifies the model in cache keys
        self.base_url, self.model, self.url_key, self.model_key = base_url, model, url_key, model_key
        self.timeout_key = timeout_key
        self.logprobs: bool | None = None  # does the server give next-token log-probs? (None: not asked yet)
        self.served: dict = {}  # the server's record of the model (check_model), e.g. vLLM's `root` (its weights)
        self.client = OpenAI(
            base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout_s, max_retries=retries
        )

    # ------------------------------------------------------------------ errors
    def _where(self) -> str:
        return f"{self.url_key} {self.base_url} (model '{self.model}')"

    def _failed(self, e: Exception) -> CsoError:
        """One line for an error of the openai client, raised after its own retries."""
        import openai

        if isinstance(e, openai.APITimeoutError):
            n = self.client.max_retries
            what = (
                f"no answer within the timeout ({self.client.timeout}s per call, {self.timeout_key}; "
                f"{n} retr{'y' if n == 1 else 'ies'})"
            )
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            what = f"cannot connect ({_first_line(cause) if cause else _first_line(e)})"
        elif isinstance(e, openai.APIStatusError):
            what = f"HTTP {e.status_code} ({type(e).__name__}: {_first_line(e)})"
        elif isinstance(e, openai.APIError):
            what = f"{type(e).__name__}: {_first_line(e)}"
        else:  # a 200 whose body is not JSON (ValueError: json.JSONDecodeError), or is no answer of the API's shape
            detail = f" ({_first_line(e, 120)})" if isinstance(e, ValueError) else ""
            return CsoError(
                f"{self._where()}: the server answered with a body that is not JSON of the OpenAI API{detail}; "
                "is it an OpenAI-compatible endpoint (e.g. http://host:8000/v1)?"
            )
        return CsoError(f"{self._where()}: {what}")

    # ------------------------------------------------------------------ evaluation
    def check_model(self) -> dict:
        """Ask the server which models it serves (GET /models); the record of ours, or one line naming the name
        given and the names served. Called once before any work."""
        import openai

        try:
            page = self.client.models.list()
            records = [m.model_dump() for m in page.data]
            names = [str(r["id"]) for r in records]
        except openai.NotFoundError as e:  # e.g. the server's root, not its API's (http://host:8000/v1)
            raise CsoError(f"{self._failed(e)}; is {self.url_key} the API's root (e.g. http://host:8000/v1)?") from None
        except (openai.APIError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise self._failed(e) from None
        for r in records:
            if r["id"] == self.model:
                self.served = r
                return r
        served = ", ".join(f"'{n}'" for n in names) if names else "none"
        raise CsoError(
            f"{self.model_key}: '{self.model}' is not served at {self.url_key} {self.base_url} (it serves: {served})"
        )

    def complete(
        self,
        prompts: list[str],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] = (),
        workers: int = 16,
        stop_token_ids: list[int] = (),
        seed: int | None = None,
    ) -> list[str]:
        """Continue each prompt text exactly as given (POST /completions; the server adds no special tokens): the
        generated texts in input order, stripped. One request per prompt, `workers` at a time (the server batches
        concurrent requests). Greedy at temperature 0. `stop`: strings that end a continuation (not returned);
        `stop_token_ids`: tokens that do (vLLM and SGLang read them). `seed`: the server's sampling seed."""
        if not prompts:
            return []
        extra = {"add_special_tokens": False, "skip_special_tokens": True}
        if stop_token_ids:
            extra["stop_token_ids"] = list(stop_token_ids)
        kw: dict = {"stop": list(stop)} if stop else {}
        if temperature > 0:
            kw["top_p"] = top_p
        if seed is not None:
            kw["seed"] = seed

        def one(prompt: str) -> str:
            import openai

            try:
                r = self.client.completions.create(
                    model=self.model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    extra_body=extra,
                    **kw,
                )
                if not r.choices:
                    raise ValueError("an answer without choices")
                return (r.choices[0].text or "").strip()
            except (openai.APIError, ValueError, TypeError, AttributeError) as e:  # after the client's retries
                raise self._failed(e) from None

        pool = ThreadPoolExecutor(max(1, min(workers, len(prompts))), thread_name_prefix="served")
        try:
            futures = [pool.submit(one, p) for p in prompts]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first failure in input order
                if f in done and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # after a failure, the requests not sent yet never are

    # ------------------------------------------------------------------ the MCTS roles
    def chat(self, messages: list[dict], max_tokens: int, temperature: float) -> str:
        import openai

        try:
            r = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature
            )
            return (r.choices[0].message.content or "").strip() if r.choices else ""
        except (openai.APIError, ValueError, TypeError, AttributeError) as e:  # after the client's own retries
            raise self._failed(e) from None

    def next_token_probs(self, probes: list[Probe], top_k: int = TOP_K) -> list[dict[str, float]] | None:
        """The prefilled assistant turn is continued (vLLM's `continue_final_message`); None when the server
        refuses that or returns no log-probs (the roles then parse text). Probes run in parallel."""
        if self.logprobs is False:
            return None
        with ThreadPoolExecutor(min(len(probes), 16)) as pool:
            out = list(pool.map(lambda p: self._probe(p, top_k), probes))
        if any(d is None for d in out):
            self.logprobs = False
            return None
        self.logprobs = True
        return out

    def _probe(self, probe: Probe, top_k: int) -> dict[str, float] | None:
        import openai

        messages, prefix = probe
        try:
            r = self.client.chat.completions.create(
                model=self.model,
                messages=[*messages, {"role": "assistant", "content": prefix}],
                max_tokens=1,
                temperature=0.0,
                logprobs=True,
                top_logprobs=min(top_k, TOP_K),
                extra_body={"continue_final_message": True, "add_generation_prompt": False},
            )
        except openai.BadRequestError:
            return None  # e.g. no prefilled assistant turns here: text answers only
        except (openai.APIError, ValueError) as e:
            raise self._failed(e) from None
        lp = r.choices[0].logprobs if r.choices else None
        if lp is None or not lp.content or not lp.content[0].top_logprobs:
            return None
        d: dict[str, float] = {}
        for t in lp.content[0].top_logprobs:
            d[t.token] = d.get(t.token, 0.0) + math.exp(t.logprob)
        return d
