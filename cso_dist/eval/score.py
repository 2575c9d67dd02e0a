"""`cso-dist eval score`: the metrics of a PRED file (ours or Kang et al.'s), and the evaluation tasks a study or
a sweep runs on a model (predict with cso_dist.eval.generate, then score)."""

from __future__ import annotations

import json
from pathlib import Path

from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import CsoError, DataError
from cso_dist.eval.metrics import OTHER_PICKS, canonical_or_none, score_rows
from cso_dist.eval.pred import refuse_duplicates
from cso_dist.util.io import atomic_write_text, read_json, read_records

TEXT_KEYS = ("bleu1", "bleu2", "bleu4", "rougeL", "distinct1", "distinct2", "mean_len")


# Kang et al.'s published prediction files (a JSON array): their keys -> ours
KANG_KEYS = {
    "strg_gold": "gold_strategy",
    "strg_pred": "pred_strategy",
    "res_gold": "gold_response",
    "res_pred": "pred_response",
}


def read_pred(path: Path, sset: StrategySet) -> list[dict]:
    """PRED rows, JSON Lines or a JSON array, in our layout (gold_strategy, pred_strategy, gold_response,
    pred_response) or Kang et al.'s (strg_gold, strg_pred, res_gold, res_pred). Gold labels fold like
    predictions (case, brackets, spacing, known aliases); an unknown gold label is an error naming it. A
    prediction may be null or any text (unknown ones are counted); responses are text or null."""
    path = Path(path)
    rows, ids = [], []
    for record, raw in read_records(path, "a PRED file"):
        if not isinstance(raw, dict):
            raise DataError(str(path), record, None, f"expected a JSON object, got {type(raw).__name__}", "wrong-type")
        row = {KANG_KEYS.get(k, k): v for k, v in raw.items() if not (k in KANG_KEYS and KANG_KEYS[k] in raw)}
        for key in ("gold_strategy", "pred_strategy"):
            if key not in row:
                raise DataError(str(path), record, key, "missing field (or its Kang et al. name)", "missing-field")
        gold = row["gold_strategy"]
        if not isinstance(gold, str):
            raise DataError(
                str(path), record, "gold_strategy", f"expected text, got {type(gold).__name__}", "wrong-type"
            )
        canon = canonical_or_none(gold, sset)
        if canon is None:
            raise DataError(
                str(path),
                record,
                "gold_strategy",
                f"unknown strategy '{gold}' (set '{sset.name}': {', '.join(sset.names)})",
                "unknown-strategy",
            )
        row["gold_strategy"] = canon
        for key in ("pred_strategy", "gold_response", "pred_response"):
            v = row.get(key)
            if v is not None and not isinstance(v, str):
                raise DataError(str(path), record, key, f"expected text or null, got {type(v).__name__}", "wrong-type")
        rows.append(row)
        ids.append((record, row.get("id")))
    if not rows:
        raise DataError(str(path), None, None, "no prediction rows", "empty-file")
    refuse_duplicates(path, ids, "keep one row of each")
    return rows


def score_file(path: Path, sset: StrategySet) -> dict:
    return score_rows(read_pred(path, sset), sset)


def format_scores(s: dict) -> str:
    lines = [
        f"Q (macro-F1) {s['Q']:.4f}   W (weighted-F1) {s['W']:.4f}   B (preference bias) {s['B']:.4f}   "
        f"accuracy {s['accuracy']:.4f}   turns {s['n']}   unknown predictions {s['unknown']}",
        f"{'strategy':<32}{'F1':>8}{'strength':>10}{'gold':>7}{'pred':>7}",
    ]
    for name, v in s["per_strategy"].items():
        lines.append(f"{name:<32}{v['f1']:>8.4f}{v['preference']:>10.4f}{v['gold']:>7}{v['predicted']:>7}")
    if s.get("bt_undetermined"):
        lines.append(
            f"strengths left at their last value (no mispredicted gold turn): {', '.join(s['bt_undetermined'])}"
        )
    for pick, label in (("first_token", "first-token rule"), ("calibrated", "prior-calibrated")):
        if pick in s:
            p = s[pick]
            lines.append(
                f"{label}: Q {p['Q']:.4f}   W {p['W']:.4f}   B {p['B']:.4f}   accuracy {p['accuracy']:.4f}   "
                "predicted " + " ".join(f"{n}:{v['predicted']}" for n, v in p["per_strategy"].items())
            )
    if s.get("text"):
        t = s["text"]
        lines.append(
            f"text ({t['rows']} of {s['n']} rows have both responses): "
            + "  ".join(f"{k} {t[k]:.3f}" for k in TEXT_KEYS if k in t)
        )
    else:
        lines.append(f"text: no metrics (0 of {s['n']} rows have both gold_response and pred_response)")
    return "\n".join(lines)


# ---------------------------------------------------------------- evaluation tasks (cso_dist.launch.EvalJob)
SUMMARY_KEYS = ("n", "Q", "W", "B", "accuracy", "unknown")


def _task_files(cfg, name: str, mode: str) -> tuple[Path, Path]:
    d = Path(cfg.run.out_dir) / "eval"
    return d / f"pred-{name}-{mode}.jsonl", d / f"scores-{name}-{mode}.json"


def _flat_scores(name: str, s: dict) -> dict:
    out = {f"{name}/{k}": s[k] for k in SUMMARY_KEYS}
    for pick in OTHER_PICKS.values():  # "test/Q_first_token", "test/B_calibrated", ...
        out.update({f"{name}/{k}_{pick}": s[pick][k] for k in ("Q", "W", "B", "accuracy") if pick in s})
    out[f"{name}/parse_rate"] = 1.0 - s["unknown"] / max(s["n"], 1)
    out.update({f"{name}/{k}": v for k, v in s.get("text", {}).items() if k in TEXT_KEYS})
    return out


def _scored(cfg, name: str, data_file, mode: str) -> dict | None:
    """The scores of a task when they exist and came from this model and data: the PRED file's recorded origin
    (cso_dist.eval.generate.pred_origin) must equal this evaluation's; scores of another model or data are an
    error naming the difference, never reused."""
    from cso_dist.eval.generate import calibration_file, calibration_record, pred_origin

    pred, scores = _task_files(cfg, name, mode)
    if not scores.is_file():
        return None
    side = pred.with_name(pred.name + ".origin.json")
    old = read_json(side, "the record of what made a PRED file's rows") if side.exists() else {}
    new = pred_origin(cfg, "test", mode, str(data_file), pred.parent / ".filehashes.json")
    if mode == "likelihood" and cfg.eval.calibrate == "prior":  # as cso_dist.eval.generate.run_generate records it
        new["calibration"] = calibration_record(cfg, calibration_file(cfg, pred))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise CsoError(
            f"{scores}: scored from {diff[0]} {old.get(diff[0])!r}, this evaluation has {new.get(diff[0])!r}; "
            f"remove {pred.parent} to score again"
        )
    return read_json(scores, "a scores file")


def finished_tasks(cfg, tasks: list) -> dict | None:
    """The flat scores of tasks [(name, data file, mode)] when every one is scored already, by this model on
    this data (else None)."""
    out: dict = {}
    for name, data_file, mode in tasks:
        scores = _scored(cfg, name, data_file, mode)
        if scores is None:
            return None
        out.update(_flat_scores(name, scores))
    return out


def evaluate_tasks(cfg, tasks: list, progress: bool = True) -> dict:
    """Predict and score model.path on each task (name, data file, mode: likelihood or generate):
    <run.out_dir>/eval/pred-<name>-<mode>.jsonl (a partial file is completed) and scores-<name>-<mode>.json.
    Returns {"<name>/Q": ..., "<name>/B": ..., ...} over every task."""
    from cso_dist.eval.generate import run_generate
    from cso_dist.inputs import resolve_sset

    sset, out = resolve_sset(cfg), {}
    for name, data_file, mode in tasks:
        done = _scored(cfg, name, data_file, mode)
        if done is None:
            pred, scores = _task_files(cfg, name, mode)
            run_generate(cfg, "test", pred, mode, str(data_file), progress=progress)
            atomic_write_text(scores, json.dumps(done := score_file(pred, sset), indent=2))
        out.update(_flat_scores(name, done))
    return out
