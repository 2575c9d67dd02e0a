"""`eval generate --backend openai`: the replies come from a model served by an OpenAI-compatible server (vLLM or
SGLang, e.g. tensor-parallel at 70B) instead of a model in this job. The prompts are rendered here, as for local
generation (model.path's tokenizer and chat template), and sent as text to the server's /completions: the server
continues exactly the tokens the local model would see. The client is cso_dist.models.served.OpenAIBackend.

The generator calls `open_served(cfg)` once before any work (the server answers and serves eval.served_model),
`served_texts(cfg, tokenizer, prompts, client)` per batch, and records `served_origin(cfg, client)` in the PRED
file's origin sidecar.
"""

from __future__ import annotations

from cso_dist.data.templates import end_of_turn_ids
from cso_dist.models.served import OpenAIBackend
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig


def served_client(cfg: TrainingConfig) -> OpenAIBackend:
    """The client of eval.endpoint / eval.served_model (timeout, retries and key variable from eval.*); no call yet."""
    e = cfg.eval
    return OpenAIBackend(
        e.endpoint,
        e.served_model,
        e.api_key_env,
        e.timeout_s,
        e.retries,
        url_key="eval.endpoint",
        model_key="eval.served_model",
        timeout_key="eval.timeout_s",
    )


def open_served(cfg: TrainingConfig) -> OpenAIBackend:
    """The client, once the server has answered that it serves eval.served_model (else one line: CsoError)."""
    client = served_client(cfg)
    client.check_model()
    return client


def _sampling(cfg: TrainingConfig) -> dict:
    e = cfg.eval
    if e.do_sample:
        return {"temperature": e.temperature, "top_p": e.top_p, "seed": cfg.run.seed}
    return {"temperature": 0.0}  # greedy


def served_texts(
    cfg: TrainingConfig, tokenizer, prompts: list[list[int]], client: OpenAIBackend | None = None
) -> list[str]:
    """The served model's continuation of each token prompt (the rendered history with the assistant turn opened),
    in input order: each prompt is decoded with its special tokens and sent as is; generation ends at the
    tokenizer's end-of-turn tokens (as text and as ids) or after eval.max_new_tokens; greedy unless eval.do_sample.
    eval.batch_size requests at a time. `client`: from open_served (default: a new one, unchecked)."""
    stop_ids = end_of_turn_ids(tokenizer)
    texts = [tokenizer.decode(p, skip_special_tokens=False, clean_up_tokenization_spaces=False) for p in prompts]
    return (client or served_client(cfg)).complete(
        texts,
        cfg.eval.max_new_tokens,
        stop=[tokenizer.decode([i], skip_special_tokens=False) for i in stop_ids],
        stop_token_ids=stop_ids,
        workers=cfg.eval.batch_size,
        **_sampling(cfg),
    )


def served_origin(cfg: TrainingConfig, client: OpenAIBackend | None = None) -> dict:
    """What a PRED file's origin sidecar records for rows from a server: the backend, the served model (and, where
    the server names them, the weights it serves: vLLM's `root`) and the generation settings. Not the endpoint: a
    server restarted on another node (a new job) serves the same model, and a run goes on there."""
    e = cfg.eval
    origin = {"backend": "openai", "served_model": e.served_model}
    root = (client.served if client is not None else {}).get("root")
    if root:
        origin["served_root"] = str(root)
    origin["generation"] = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample}
    if e.do_sample:
        origin["generation"].update(temperature=e.temperature, top_p=e.top_p, seed=cfg.run.seed)
    return origin
