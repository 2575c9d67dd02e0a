"""The reference log-prob cache: precompute (sharded, resumable, multi-rank), verified load, export.

Layout of one cache (the train cache is the cache root; the eval file, when set, gets a cache of
the same format in <root>/eval, with its own key):
  manifest.json                 {"format", "key", "info", "n_dialogues", "dialogues_per_shard",
                                 "n_shards", "plan": [[lo, hi], ...], "shards": {"i": {"sha256",
                                 "replies", "dialogues"}}, "complete"}
  shards/shard-00000.json       {"format", "shard", "lo", "hi", "dialogue_ids", "reply_ids",
                                 "logps" (float32 results as float64, exact JSON round trip), "tokens"}
  shards/shard-00000.done.json  sidecar written after the shard: {"shard", "key", "sha256",
                                 "replies", "dialogues", "tokens", "seconds"}
Shard i holds dialogues [i*D, (i+1)*D); rank r computes the shards with i % world_size == r.
A shard counts as done only when its sidecar exists, names this key, and the file's sha256 and
reply count match it (and the manifest entry, where there is one). Every file is written
atomically. The manifest's per-shard entries are filled in once every shard verifies.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cso_dist.data.dialogue import read_dialogues
from cso_dist.util.io import atomic_write_text, read_json, sha256_file, write_jsonl
from cso_dist.data.export import iter_pairs
from cso_dist.data.render import Renderer
from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import ConfigError, CsoError, DataError
from cso_dist.engines import dist
from cso_dist.engines.dist import World, world_from_env
from cso_dist.engines import Engine, shards_weights
from cso_dist.engines.build import build_scorer, fill, held, lockstep
from cso_dist.pack import LaidOut, ReplyId, collate_trie, head_chunks, lay_out, pack_units
from cso_dist.util.progress import progress as progress_bar
from cso_dist.scorer import by_reply
from cso_dist.scorer.attention import compile_count
from cso_dist.inputs import SPLITS, SplitInputs, ensure_model, load_split, make_cfg_renderer, resolve_sset
from cso_dist.refcache.key import (
    FORMAT_VERSION,
    cache_key,
    cache_root,
    canonical_reply_order,
    differing,
    key_digest,
    key_info,
    memo_path,
    reference_finetune,
    reply_kinds,
    split_dir,
)

if TYPE_CHECKING:
    from cso_dist.config import TrainingConfig

MANIFEST = "manifest.json"
SHARD_DIR = "shards"


@dataclass
class PrecomputeReport:
    split: str
    cache_dir: Path
    n_shards: int
    mine: list[int] = field(default_factory=list)  # shards assigned to this rank
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already present and verified
    invalid: dict[int, str] = field(default_factory=dict)  # present but failed verification -> recomputed
    tokens: int = 0
    seconds: float = 0.0
    complete: bool = False
    param_bytes: dict = field(default_factory=dict)  # the scoring engine's (now, peak, whole) after its forwards
    compiles: int | None = None  # graphs compiled while scoring (flex attention); None when nothing compiles

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Invalid(Exception):
    """A shard that cannot be trusted; the message says why."""


def shard_file(d: Path, i: int) -> Path:
    return d / SHARD_DIR / f"shard-{i:05d}.json"


def sidecar_file(d: Path, i: int) -> Path:
    return d / SHARD_DIR / f"shard-{i:05d}.done.json"


def _write_json(path: Path, obj: dict, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def read_manifest(d: Path) -> dict | None:
    p = Path(d) / MANIFEST
    if not p.is_file():
        return None
    try:
        return read_json(p, "a reference cache's manifest", fields={"key": dict})
    except DataError as e:
        why = ": ".join(x for x in (e.record, e.field, e.message) if x)
        raise CsoError(
            f"reference cache {d}: manifest.json is damaged ({why}); delete {d} and rerun cso-dist precompute"
        ) from None


def _sidecar(d: Path, i: int, kd: str) -> dict:
    s = sidecar_file(d, i)
    if not s.is_file():
        raise _Invalid("missing" if not shard_file(d, i).is_file() else "no completion record (interrupted write)")
    try:
        side = read_json(s, "a shard's completion record")
    except DataError:
        raise _Invalid("completion record is damaged") from None
    if side.get("key") != kd:
        raise _Invalid("completion record belongs to another key")
    return side


def _read_shard(d: Path, i: int, expect: dict) -> dict:
    f = shard_file(d, i)
    if not f.is_file():
        raise _Invalid("missing")
    data = f.read_bytes()
    if hashlib.sha256(data).hexdigest() != expect.get("sha256"):
        raise _Invalid(f"corrupt (sha256 mismatch, {len(data)} bytes)")
    try:
        obj = json.loads(data)
        ok = obj["shard"] == i and len(obj["reply_ids"]) == len(obj["logps"]) == len(obj["tokens"]) == expect["replies"]
    except (ValueError, KeyError, TypeError):
        raise _Invalid("corrupt (unreadable)") from None
    if not ok:
        raise _Invalid("reply count mismatch")
    return obj


def _verified(d: Path, i: int, kd: str, man: dict | None = None) -> tuple[dict, dict]:
    """(sidecar, shard content) of a shard that verifies; _Invalid otherwise."""
    side = _sidecar(d, i, kd)
    entry = ((man or {}).get("shards") or {}).get(str(i))
    if entry is not None and (entry.get("sha256"), entry.get("replies")) != (side.get("sha256"), side.get("replies")):
        raise _Invalid("does not match the manifest")
    return side, _read_shard(d, i, side)


def _plan(n: int, per: int) -> list[list[int]]:
    return [[lo, min(lo + per, n)] for lo in range(0, n, per)]


def _open_cache(d: Path, key: dict[str, str], split: str) -> dict | None:
    """The existing manifest of `d` (refusing a stale or foreign directory), or None when there is none. The folder is
    listed before its manifest is read: another rank may write the manifest at any moment, and a manifest that
    appears after the listing is then read, never taken for a foreign file."""
    entries = [p.name for p in d.iterdir()] if d.is_dir() else []
    man = read_manifest(d)
    if man is not None:
        diff = differing(man, key)
        if diff:
            raise CsoError(
                f"reference cache {d} was built for a different {', '.join(diff)}: delete {d} "
                f"or point train.ref_cache elsewhere, then rerun cso-dist precompute"
            )
        return man
    other = [
        n for n in entries if not (split == "train" and n == "eval") and not (n.startswith(".") and n.endswith(".tmp"))
    ]
    if other:
        raise CsoError(
            f"reference cache {d}: the folder exists, is not empty ({', '.join(sorted(other)[:3])}) and "
            f"has no manifest.json; delete it or point train.ref_cache elsewhere"
        )
    return None


def _score_shards(
    d: Path,
    todo: list[int],
    plan: list[list[int]],
    laid: LaidOut | None,
    engine,
    cfg: TrainingConfig,
    kd: str,
    split: str,
    progress: bool,
    rep: PrecomputeReport,
) -> None:
    """Score and write this rank's `todo` shards, each as soon as it is done. Under a collective engine (ZeRO-3)
    every rank runs the same number of forwards with the same number of LM-head calls (a rank with fewer shards,
    or none, runs filler rows after its own), or the job would hang."""
    chunk, max_tokens = cfg.scorer.logit_chunk, cfg.pack.max_tokens
    work = {i: pack_units(laid.all_units(list(range(*plan[i]))), max_tokens) for i in todo} if laid else {}
    mine = sum(len(groups) for groups in work.values())
    chunks = max((head_chunks(g, chunk) for groups in work.values() for g in groups), default=0)
    forwards, head_calls = lockstep(engine, mine, chunks)
    compiled = compile_count()
    with engine.reference():
        for i, groups in work.items():
            t0, scores, ntok = time.perf_counter(), {}, sum(len(u) for g in groups for u in g)
            desc = f"{split} shard {i + 1}/{len(plan)}"
            with progress_bar(total=ntok, desc=desc, unit="tok", enabled=progress, unit_scale=True) as bar:
                for g in groups:
                    batch = collate_trie(g)
                    by_reply(batch, engine.score(batch, head_calls), scores)
                    bar.update(batch.n_tokens)
            secs = time.perf_counter() - t0
            _write_shard(d, i, *plan[i], laid, scores, kd, ntok, secs, engine.param_bytes())
            rep.computed.append(i)
            rep.tokens += ntok
            rep.seconds += secs
        fill(engine, forwards - mine, head_calls)
    rep.param_bytes = engine.param_bytes()
    if engine.scorer.attention == "flex":
        rep.compiles = compile_count() - compiled


def _write_shard(
    d: Path, i: int, lo: int, hi: int, laid: LaidOut, scores: dict, kd: str, ntok: int, secs: float, held: dict
) -> None:
    ids = canonical_reply_order(laid.all_units(list(range(lo, hi))))
    if set(ids) != set(scores):
        raise CsoError(f"reference cache: shard {i}: scored replies do not match the layout (internal error)")
    obj = {
        "format": FORMAT_VERSION,
        "shard": i,
        "lo": lo,
        "hi": hi,
        "dialogue_ids": [dl.id for dl in laid.dialogues[lo:hi]],
        "reply_ids": ids,
        "logps": [float(scores[r][0]) for r in ids],
        "tokens": [int(scores[r][1]) for r in ids],
    }
    text = json.dumps(obj, separators=(",", ":"))  # ASCII (ensure_ascii), floats via repr: exact round trip
    atomic_write_text(shard_file(d, i), text)
    _write_json(
        sidecar_file(d, i),
        {
            "shard": i,
            "key": kd,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "replies": len(ids),
            "dialogues": hi - lo,
            "tokens": ntok,
            "seconds": secs,
            "param_bytes": held,  # what the rank that wrote it held (engine.param_bytes: now, peak, whole)
        },
    )


def _finalize(d: Path, man: dict, kd: str) -> bool:
    """Record every shard's sha256 + reply count in the manifest once all verify (never downgrades)."""
    entries = {}
    for i in range(man["n_shards"]):
        try:
            side, _ = _verified(d, i, kd)
        except _Invalid:
            return False
        entries[str(i)] = {"sha256": side["sha256"], "replies": side["replies"], "dialogues": side["dialogues"]}
    new = dict(man, shards=entries, complete=True)
    if new != man:
        _write_json(d / MANIFEST, new)
    return True


def _precompute_split(
    cfg: TrainingConfig,
    inputs: SplitInputs,
    key: dict[str, str],
    renderer: Renderer,
    sset: StrategySet,
    world: World,
    progress: bool,
    get_engine: Callable[[], Engine],
) -> PrecomputeReport:
    d = split_dir(cache_root(cfg), inputs.split)
    man = _open_cache(d, key, inputs.split)
    if man is None:
        per = cfg.refcache.dialogues_per_shard
        plan = _plan(len(inputs.dialogues), per)
        man = {
            "format": FORMAT_VERSION,
            "key": key,
            "info": key_info(cfg, inputs, sset),
            "n_dialogues": len(inputs.dialogues),
            "dialogues_per_shard": per,
            "n_shards": len(plan),
            "plan": plan,
            "shards": {},
            "complete": False,
        }
        _write_json(d / MANIFEST, man)
    elif man["dialogues_per_shard"] != cfg.refcache.dialogues_per_shard:
        print(
            f"note: {d} uses {man['dialogues_per_shard']} dialogues per shard; keeping its plan "
            f"(refcache.dialogues_per_shard={cfg.refcache.dialogues_per_shard} ignored)",
            flush=True,
        )
    kd, plan = key_digest(key), man["plan"]
    rep = PrecomputeReport(
        inputs.split, d, len(plan), [i for i in range(len(plan)) if i % world.world_size == world.rank]
    )
    todo = []
    for i in rep.mine:
        try:
            _verified(d, i, kd)
            rep.skipped.append(i)
        except _Invalid as e:
            if str(e) != "missing":
                rep.invalid[i] = str(e)
                print(f"{d}: shard {i}: {e}; recomputing", flush=True)
            todo.append(i)
    # a collective engine (ZeRO-3) loads and scores on every rank together, also on ranks with nothing to do
    together = shards_weights(cfg)
    if dist.any_true(bool(todo)) if together else todo:
        engine = get_engine()
        laid = None
        if todo:
            try:
                kl = "kl" in reply_kinds(cfg)  # KTO's KL branches only in a KTO cache
                laid = lay_out(
                    inputs.dialogues, renderer, sset, cfg.pack.max_tokens, cfg.data.max_length, kl=kl, progress=progress
                )
            except ValueError as e:
                raise CsoError(str(e)) from None
        _score_shards(d, todo, plan, laid, engine, cfg, kd, inputs.split, progress, rep)
    if together:
        dist.barrier()  # every rank's shards are written: the cache is complete for all of them at once
    rep.complete = _finalize(d, man, kd)
    missing = len(rep.computed) - len(rep.invalid)
    what = f"; {held(rep.param_bytes)}" if rep.param_bytes else ""
    if rep.compiles is not None:
        what += f"; flex attention (rows padded to multiples of {cfg.pack.bucket}): {rep.compiles} graphs compiled"
    print(
        f"precompute [{inputs.split}] rank {world.rank}/{world.world_size}: {len(rep.mine)} of {len(plan)} shards: "
        f"{len(rep.computed)} computed ({missing} missing, {len(rep.invalid)} failed verification), "
        f"{len(rep.skipped)} verified and kept; {rep.tokens:,} tokens in {rep.seconds:.1f}s "
        f"({rep.tokens_per_s:,.0f} tok/s){what}; cache {'complete' if rep.complete else 'partial'}: {d}",
        flush=True,
    )
    return rep


def precompute(
    cfg: TrainingConfig, rank: int = 0, world_size: int = 1, progress: bool = True, device: str | None = None
) -> list[PrecomputeReport]:
    """Compute this rank's shards of the train cache (and of the eval cache when train.eval_file is set), with the
    reference model placed by the training engine (dist.engine: under ZeRO-3 partitioned over the ranks, which
    then score together; `device`: the torch engine's). The process group, where there are several ranks, is
    the caller's (cso-dist precompute and train join it first)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"precompute: rank {rank} is not in [0, world_size={world_size})")
    world = World(rank, world_size, world_from_env().local_rank if world_size > 1 else 0)
    root = cache_root(cfg)
    renderer, sset = make_cfg_renderer(cfg), resolve_sset(cfg)
    jobs = []
    for split in SPLITS:
        inputs = load_split(cfg, split)
        if inputs is not None:
            key = cache_key(cfg, split, renderer, sset, memo_path(root))
            _open_cache(split_dir(root, split), key, split)  # refuse stale caches before any work
            jobs.append((inputs, key))
    held: list = []

    def get_engine():
        if not held:
            held.append(build_scorer(cfg, world, reference_finetune(cfg), device))
        return held[0]

    try:
        return [
            _precompute_split(cfg, inputs, key, renderer, sset, world, progress, get_engine) for inputs, key in jobs
        ]
    finally:
        for engine in held:
            engine.close()


def run_precompute(cfg: TrainingConfig, progress: bool = True) -> Path:
    """The body of `cso-dist precompute CONFIG`; returns the cache root. Under torchrun / srun every rank computes its
    own shards (it joins the job's process group first). A Hub id not in the HF cache yet is downloaded first, by
    each node's local rank 0 (cso_dist.inputs.ensure_model)."""
    world = world_from_env()
    ensure_model(cfg, world.local_rank)
    with dist.joined(world, cfg.dist.timeout_minutes):
        precompute(cfg, world.rank, world.world_size, progress and world.main)
    return cache_root(cfg)


def ensure_reference(
    cfg: TrainingConfig, split: str, renderer, sset, world: World, progress: bool = True
) -> dict[str, tuple[float, int]]:
    """The split's reference log-probs for cfg: the cache verified against its key, computed first when it is
    missing, stale-free but partial -- each rank its own shards, the other ranks' waited for through the files (no
    collective, so no timeout but dist.timeout_minutes). Under a collective engine (ZeRO-3) the ranks decide and
    compute together. The one entry point training uses."""
    key = cache_key(cfg, split, renderer, sset)
    d = split_dir(cache_root(cfg), split)
    status = cache_status(d, key)
    needed = status != "complete"
    if dist.any_true(needed) if shards_weights(cfg) else needed:
        if world.main:
            print(
                f"reference cache for {split} is {status}: running precompute first "
                f"({world.world_size} rank{'s' if world.distributed else ''})",
                flush=True,
            )
        precompute(cfg, world.rank, world.world_size, progress=progress)
        t0 = time.time()
        while cache_status(d, key) != "complete":
            if time.time() - t0 > cfg.dist.timeout_minutes * 60:
                raise CsoError(
                    f"reference cache {d}: other ranks' shards still missing after "
                    f"{cfg.dist.timeout_minutes} min (dist.timeout_minutes)"
                )
            time.sleep(2)
    return load_reference(cfg, key, split)


def _cache_dir_of(cfg_or_cache_dir: TrainingConfig | str | Path, split: str) -> Path:
    if isinstance(cfg_or_cache_dir, (str, Path)):
        return Path(cfg_or_cache_dir)
    return split_dir(cache_root(cfg_or_cache_dir), split)


def load_reference(
    cfg_or_cache_dir: TrainingConfig | str | Path, expected_key: dict[str, str], split: str = "train"
) -> dict[str, tuple[float, int]]:
    """reply id -> (reference summed log-prob, token count), after checking the key and every shard.

    A config selects the cache of `split` (train: the cache root, eval: <root>/eval); a path
    is used as the cache folder itself.
    """
    d = _cache_dir_of(cfg_or_cache_dir, split)
    man = read_manifest(d)
    if man is None:
        raise CsoError(f"no reference cache at {d} (run cso-dist precompute)")
    diff = differing(man, expected_key)
    if diff:
        raise CsoError(
            f"reference cache {d} was built for a different {', '.join(diff)} (delete it and rerun "
            f"cso-dist precompute, or point train.ref_cache elsewhere)"
        )
    kd, out, bad = key_digest(expected_key), {}, []
    for i in range(man["n_shards"]):
        try:
            _, obj = _verified(d, i, kd, man)
        except _Invalid as e:
            bad.append(f"shard {i}: {e}")
            continue
        out.update(zip(obj["reply_ids"], zip(obj["logps"], obj["tokens"])))
    if bad:
        more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise CsoError(
            f"reference cache {d}: {len(bad)} of {man['n_shards']} shards missing or corrupt "
            f"({'; '.join(bad[:4])}{more}); rerun cso-dist precompute to recompute them"
        )
    return out


def cache_status(cache_dir: str | Path, key: dict[str, str]) -> str:
    """ "missing" (no manifest), "stale" (another key), "complete" (every shard verifies) or "partial"."""
    d = Path(cache_dir)
    try:
        man = read_manifest(d)
    except CsoError:
        return "stale"
    if man is None:
        return "missing"
    if differing(man, key):
        return "stale"
    kd = key_digest(key)
    for i in range(man["n_shards"]):
        try:
            _verified(d, i, kd, man)
        except _Invalid:
            return "partial"
    return "complete"


def export_cache(cache_dir: str | Path, out: str | Path) -> int:
    """One JSON row per DPO pair (order of `data pairs --format dpo`) with the cached reference values."""
    d = Path(cache_dir)
    man = read_manifest(d)
    if man is None:
        raise CsoError(f"no reference cache at {d} (manifest.json missing)")
    info = man.get("info") or {}
    path = Path(info.get("data_file", ""))
    if not path.is_file():
        raise CsoError(f"reference cache {d}: its dialogue file {path} no longer exists")
    if sha256_file(path) != info.get("data_sha256"):
        raise CsoError(
            f"reference cache {d}: dialogue file {path} changed since the cache was built; "
            f"rerun cso-dist precompute on it before exporting"
        )
    values = load_reference(d, man["key"])
    dialogues = read_dialogues(path)
    dialogues = dialogues[: info["max_dialogues"]] if info.get("max_dialogues") else dialogues
    ss = info["strategy_set"]
    sset = StrategySet(ss["name"], dict(ss["descriptions"]), dict(ss.get("aliases") or {}))
    rows = []
    for pid, _ in iter_pairs(dialogues, sset, "dpo"):
        cid = ReplyId.parse(pid).chosen()
        if cid not in values or pid not in values:
            raise CsoError(f"reference cache {d}: no value for pair {pid} (cache and dialogue file disagree)")
        (c_lp, c_n), (r_lp, r_n) = values[cid], values[pid]
        rows.append(
            {"pair_id": pid, "chosen_logp": c_lp, "rejected_logp": r_lp, "chosen_tokens": c_n, "rejected_tokens": r_n}
        )
    return write_jsonl(out, rows)
