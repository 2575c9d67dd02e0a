"""`cso-dist mcts build`: search every seed dialogue's strategy tree and write ESC-Pro records.

Trees run in a thread pool (`mcts.workers`); the HF backend batches their concurrent calls,
the HTTP backend runs them in parallel. Every LLM answer is cached on disk, and every tree is
checkpointed (`<out>.work/trees/<seed>.json`, atomically) every `mcts.checkpoint_every`
iterations, so an interrupted build resumes where it stopped and a rerun costs no LLM call.
`--shard I/N` builds every N-th seed (a Slurm array task); `merge` joins the parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from cso_dist.util.progress import progress as progress_bar

from cso_dist.util.io import atomic_write_text, one_writer
from cso_dist.util.errors import CsoError
from cso_dist.mcts.backends import CachedBackend, make_backend
from cso_dist.mcts.llm_roles import LLMRoles, RoleSettings, load_prompts
from cso_dist.mcts.search import SearchConfig, SearchSettings, Tree, extract, new_tree, run
from cso_dist.mcts.seeds import Seed, read_seeds
from cso_dist.models.identity import model_key

if TYPE_CHECKING:
    from cso_dist.config import Config


def search_config(cfg: Config) -> SearchConfig:
    """The search settings of the mcts config section (inherited from SearchSettings); the rest fixed."""
    return SearchConfig(**{f.name: getattr(cfg.mcts, f.name) for f in dataclasses.fields(SearchSettings)})


def format_report(r: dict) -> str:
    """The lines `cso-dist mcts build` / `submit` print for one build report."""
    lines = [
        f"wrote {r['records']} ESC-Pro records from {r['seeds']} seed dialogues to {r['out']} "
        f"({r['wall_s']:.1f} s; strategy set {r['strategy_set']})",
        f"  LLM calls: {r['llm_calls_made']} made ({r.get('llm_probes_made', 0)} of them next-token probes), "
        f"{r['llm_calls_cached']} from the cache; "
        f"{r['llm_calls_per_tree']:.0f} per seed dialogue, {r['wall_s_per_tree']:.1f} s per tree",
    ]
    for role, x in r.get("parse", {}).items():
        if "asked" in x and x["asked"]:
            mass = x["mean_mass_on_answers"]
            lines.append(
                f"  {role}: {x['asked']} answers, {x['from_logprobs']:.0%} from log-probs"
                + (f" (mean probability on the allowed answers {mass:.2f})" if mass is not None else "")
                + f", {x['parsed_text']:.0%} parsed from text, {x['missing']:.0%} missing"
            )
        elif x.get("asks"):
            first, empty = x["first_try"], x["empty"]
            lines.append(f"  {role}: {x['asks']} replies, {first:.0%} on the first try, {empty:.0%} empty")
    failures = ("missing_", "empty_", "retries_", "text_fallback_")
    issues = {k: v for k, v in r["role_stats"].items() if k.startswith(failures) and v}
    dropped = {k: v for k, v in r["dropped"].items() if v}
    if issues or dropped:
        lines.append(f"  malformed/missing answers: {issues or 'none'}; dropped: {dropped or 'none'}")
    return "\n".join(lines)


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise CsoError(f"mcts build: --shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise CsoError(f"mcts build: --shard {spec!r}: need 0 <= I < N")
    return i, n


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def clean_records(records: list[dict], dropped: Counter) -> list[dict]:
    """Drop (and count) empty replies: an empty preferred reply drops its record, an empty negative itself."""
    out = []
    for r in records:
        ok = True
        for m in r["messages"]:
            if m["role"] == "assistant":
                if not m["content"].strip():
                    ok = False
                keep = [o for o in m.get("negative", []) if o["content"].strip()]
                dropped["empty_negatives"] += len(m.get("negative", [])) - len(keep)
                m["negative"] = keep
        msgs = r["messages"]
        if msgs and msgs[-1]["role"] == "user" and not msgs[-1]["content"].strip():
            r["messages"] = msgs[:-1]  # an empty closing seeker message adds nothing
        if ok:
            out.append(r)
        else:
            dropped["records_with_empty_preferred_reply"] += 1
    return out


def seed_digest(seed: Seed) -> str:
    """sha256 of a seed dialogue's content (what a tree is searched on)."""
    content = [seed.description, seed.scene, [list(t) for t in seed.turns]]  # Turn: a NamedTuple
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


class _Checkpoints:
    """Tree checkpoints: each records the search settings, what searched it (backend, model and the model's
    content key) and its seed dialogue's digest; a checkpoint made otherwise is refused, never reused."""

    def __init__(self, folder: Path, scfg: SearchConfig, origin: dict):
        self.folder, self.scfg, self.origin = folder, json.loads(json.dumps(dataclasses.asdict(scfg))), origin
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, seed: Seed) -> Path:
        return self.folder / f"{seed.id}.json"

    def load(self, seed: Seed) -> dict | None:
        p = self.path(seed)
        if not p.is_file():
            return None
        state = json.loads(p.read_text(encoding="utf-8"))
        redo = f"remove {self.folder} to start over, or give another --out"
        if state.get("search") != self.scfg:
            raise CsoError(
                f"mcts build: {p} was searched with other mcts settings ({state.get('search')}); "
                f"remove {self.folder} to start over, or use the same settings"
            )
        if state.get("origin") != self.origin:
            raise CsoError(f"mcts build: {p} was built by {state.get('origin')}, this build uses {self.origin}: {redo}")
        if state.get("seed_sha256") != seed_digest(seed):
            raise CsoError(
                f"mcts build: {p} was searched on another seed dialogue {seed.id} (an edited seeds file, or another "
                f"file of the same name): {redo}"
            )
        return state

    def save(self, seed: Seed, tree, done: bool, wall_s: float, stats: Counter) -> dict:
        state = {
            "search": self.scfg,
            "origin": self.origin,
            "seed_sha256": seed_digest(seed),
            "done": done,
            "wall_s": wall_s,
            "llm_stats": dict(stats),
            "tree": tree.to_dict(),
        }
        atomic_write_text(self.path(seed), json.dumps(state, ensure_ascii=False))
        return state


def build(
    cfg: Config, seeds_file: str, out: str | Path, shard: tuple[int, int] = (0, 1), progress: bool = True
) -> dict:
    """Search every seed of `seeds_file` (this shard's) into `out`; one writer per --out (its work folder)."""
    m = cfg.mcts
    out = Path(out)
    seeds, sset = read_seeds(seeds_file, m.strategies, limit=m.max_seeds)
    seeds = seeds[shard[0] :: shard[1]]
    if not seeds:
        raise CsoError(f"mcts build: shard {shard[0]}/{shard[1]} of {seeds_file} holds no seed dialogue")
    with one_writer(work_dir(out) / ".cso-lock", "cso-dist mcts build"):
        return _build(cfg, seeds, sset, out, progress)


def _build(cfg: Config, seeds: list[Seed], sset, out: Path, progress: bool) -> dict:
    m = cfg.mcts
    work = work_dir(out)
    scfg = search_config(cfg)
    inner = make_backend(m.backend, m.model, m.base_url, m.api_key_env, m.timeout_s, m.retries, m.batch_size, m.seed)
    origin = {"backend": inner.name}
    if m.backend == "hf":  # the folder's content, not only its path
        origin["model_key"] = model_key(inner.folder, work / ".filehashes.json")
    ckpts = _Checkpoints(work / "trees", scfg, origin)
    prompts = load_prompts(m.prompts)
    backend = CachedBackend(inner, m.cache_dir or work / "cache")
    settings = RoleSettings(
        max_new_tokens=m.max_new_tokens,
        temperature=m.temperature,
        retries=m.parse_retries,
        scorer_max_tokens=m.scorer_max_tokens,
        judge_max_tokens=m.judge_max_tokens,
        choice=m.choice,
    )
    t_start = time.monotonic()

    def one(seed: Seed) -> dict:
        state = ckpts.load(seed)
        if state and state["done"]:
            return state
        tree = Tree.from_dict(state["tree"]) if state else new_tree(seed.id, seed.description, seed.scene, seed.turns)
        stats = Counter(state["llm_stats"]) if state else Counter()
        roles = LLMRoles(backend, sset, prompts, seed.description, seed.scene, settings, stats)
        wall0, t0 = (state["wall_s"] if state else 0.0), time.monotonic()

        def checkpoint(t) -> None:
            if t.iterations % m.checkpoint_every == 0:
                ckpts.save(seed, t, False, wall0 + time.monotonic() - t0, stats)

        run(tree, roles, scfg, on_iteration=checkpoint)
        return ckpts.save(seed, tree, True, wall0 + time.monotonic() - t0, stats)

    states: dict[str, dict] = {}
    with (
        progress_bar(total=len(seeds), desc="mcts trees", unit="tree", enabled=progress) as bar,
        ThreadPoolExecutor(max_workers=m.workers) as pool,
    ):
        futures = {pool.submit(one, s): s for s in seeds}
        pending = set(futures)
        while pending:  # refresh the LLM call rate every few seconds, not only when a tree ends
            done, pending = wait(pending, timeout=5.0, return_when=FIRST_COMPLETED)
            for f in done:
                states[futures[f].id] = f.result()
            rate = backend.calls / max(time.monotonic() - t_start, 1e-9)
            bar.set_postfix(llm_calls=backend.calls, cached=backend.hits, calls_per_s=f"{rate:.1f}")
            bar.update(len(done))

    dropped: Counter = Counter()
    records: list[dict] = []
    for s in seeds:
        records += clean_records(extract(Tree.from_dict(states[s.id]["tree"]), scfg), dropped)
    atomic_write_text(out, json.dumps(records, ensure_ascii=False, indent=1))
    per_tree = [
        {
            "seed": s.id,
            "iterations": states[s.id]["tree"]["iterations"],
            "llm_calls": sum(v for k, v in states[s.id]["llm_stats"].items() if k.startswith("calls_")),
            "wall_s": states[s.id]["wall_s"],
        }
        for s in seeds
    ]
    totals: Counter = Counter()
    for s in seeds:
        totals.update(states[s.id]["llm_stats"])
    report = {
        "out": str(out),
        "seeds": len(seeds),
        "records": len(records),
        "strategy_set": sset.name,
        "backend": backend.name,
        "llm_calls_made": backend.calls,
        "llm_calls_cached": backend.hits,
        "llm_probes_made": backend.probes,
        "llm_calls_per_tree": (sum(t["llm_calls"] for t in per_tree) / len(per_tree)) if per_tree else 0.0,
        "wall_s_per_tree": (sum(t["wall_s"] for t in per_tree) / len(per_tree)) if per_tree else 0.0,
        "role_stats": dict(sorted(totals.items())),
        "parse": parse_rates(totals),
        "dropped": dict(dropped),
        "trees": per_tree,
        "wall_s": time.monotonic() - t_start,
    }
    atomic_write_text(out.with_name(out.name + ".report.json"), json.dumps(report, indent=1))
    return report


def parse_rates(stats: Counter) -> dict:
    """Per role: how its answers were had. Scorer and judge: the share of the values asked for that came
    from log-probs, from parsed text, or not at all (missing), and the mean probability the model put on
    the allowed answers; supporter and seeker: the share of calls answered on the first try, and of
    empty answers after the retries."""
    out = {}
    for role, unit in (("scorer", "scores"), ("judge", "ratings")):
        asked = stats[f"asked_{unit}"]
        lp = stats[f"logprob_answers_{role}"]
        missing = stats[f"missing_{unit}"]
        out[role] = {
            "asked": asked,
            "from_logprobs": lp / asked if asked else None,
            "parsed_text": (asked - lp - missing) / asked if asked else None,
            "missing": missing / asked if asked else None,
            "mean_mass_on_answers": stats[f"logprob_mass_{role}"] / lp if lp else None,
            "text_retries": stats[f"retries_{role}"],
        }
    for role in ("supporter", "seeker"):
        asks = stats[f"calls_{role}"] - stats[f"retries_{role}"]  # the calls count every retry
        out[role] = {
            "asks": asks,
            "first_try": 1 - stats[f"reasked_{role}"] / asks if asks else None,
            "empty": stats[f"empty_{role}"] / asks if asks else None,
        }
    return out


def merge(parts: list[str | Path], out: str | Path) -> int:
    """Join the record lists of several shard outputs (in the order given) into one ESC-Pro file."""
    records: list[dict] = []
    for p in parts:
        p = Path(p)
        if not p.is_file():
            raise CsoError(f"mcts merge: {p}: no such file (did that array task finish?)")
        try:
            part = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CsoError(f"mcts merge: {p}: bad JSON: {e.msg}") from None
        if not isinstance(part, list):
            raise CsoError(f"mcts merge: {p}: expected a list of ESC-Pro records")
        records += part
    atomic_write_text(Path(out), json.dumps(records, ensure_ascii=False, indent=1))
    return len(records)
