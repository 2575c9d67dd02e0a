"""`cso-dist eval report`: a Markdown report with plots (confusion matrix, preference strengths, gold vs
predicted strategy distribution, training curves) for one or several runs side by side, from the scores of
their PRED files (cso_dist.eval.score)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cso_dist.util.io import atomic_write_text
from cso_dist.data.strategies import StrategySet
from cso_dist.util.errors import DataError
from cso_dist.eval.score import TEXT_KEYS, format_scores, read_pred, score_file
from cso_dist.losses import BASELINE
from cso_dist.train.tracking import read_metrics


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(s: dict, path: Path, title: str) -> None:
    plt = _plt()
    conf = np.array(s["confusion"]).T  # rows gold, columns predicted
    names = s["strategies"]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                int(conf[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if conf[i, j] > conf.max() / 2 else "black",
            )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(s: dict, path: Path, title: str) -> None:
    """Preference strengths (the bias picture) and gold vs predicted strategy counts."""
    plt = _plt()
    names = s["strategies"]
    per = s["per_strategy"]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(x, [per[n]["preference"] for n in names], color="tab:orange")
    a.axhline(1.0, color="gray", lw=0.8, ls="--")
    a.set_title(f"preference strengths (B = {s['B']:.3f})", fontsize=9)
    b.bar(x - 0.2, [per[n]["gold"] for n in names], 0.4, label="gold")
    b.bar(x + 0.2, [per[n]["predicted"] for n in names], 0.4, label="predicted")
    b.legend(fontsize=8)
    b.set_title("strategy distribution", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(metrics: list[dict], path: Path, title: str) -> bool:
    keys = ("loss", "rewards/margins", "rewards/accuracies")
    train = [m for m in metrics if "loss" in m]
    if not train:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, k in zip(axes, keys):
        pts = [(m["step"], m[k]) for m in train if k in m]
        ev = [(m["step"], m[f"eval/{k}"]) for m in metrics if f"eval/{k}" in m]
        if pts:
            ax.plot(*zip(*pts), label="train", lw=1)
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval", ms=3)
        ax.set_title(k if pts or ev else f"{k}: not logged", fontsize=9)
        ax.set_xlabel("step")
        if pts or ev:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def plot_groups(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    """Q and B per group (method): mean ± std over its runs (seeds), every run as a dot."""
    plt = _plt()
    names = list(groups)
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.3 * len(names) + 3), 4))
    for ax, key, label in zip(axes, ("Q", "B"), ("Q (macro-F1, higher is better)", "B (bias, lower is better)")):
        for i, n in enumerate(names):
            vals = [s[key] for s in groups[n]]
            m, sd = spread(vals)
            ax.bar(i, m, yerr=sd, capsize=4, color="tab:blue" if n not in ("base", BASELINE) else "tab:gray", alpha=0.7)
            ax.plot([i] * len(vals), vals, "k.", ms=5)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_group_strengths(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    """Per-strategy preference strengths per group: mean ± std over its runs (the bias picture)."""
    plt = _plt()
    names = next(iter(groups.values()))[0]["strategies"]
    x, w = np.arange(len(names)), 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for j, (g, runs) in enumerate(groups.items()):
        stats = [spread([s["per_strategy"][n]["preference"] for s in runs]) for n in names]
        ax.bar(
            x + (j - (len(groups) - 1) / 2) * w,
            [m for m, _ in stats],
            w,
            yerr=[sd for _, sd in stats],
            label=g,
            capsize=2,
        )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("preference strength")
    ax.legend(fontsize=8, ncol=len(groups))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_section(groups: dict[str, list[Path]], out: Path, sset: StrategySet) -> list[str]:
    """For each prediction file every run of a group has: Q/B per group with error bars, the groups'
    preference strengths, and each group's confusion matrix summed over its runs; the lines of report.md."""
    stems = sorted(set.intersection(*({p.name for p in pred_files(Path(r))} for rs in groups.values() for r in rs)))
    lines = ["## groups (mean ± std over each group's runs)", ""]
    lines += [f"- {g}: " + ", ".join(f"`{r}`" for r in rs) for g, rs in groups.items()] + [""]
    for stem in stems:
        scores = {g: [score_file(Path(r) / "eval" / stem, sset) for r in rs] for g, rs in groups.items()}
        tag = Path(stem).stem
        plot_groups(scores, out / f"groups-{tag}.png", f"{stem}: per group, mean ± std (dots: runs)")
        plot_group_strengths(scores, out / f"groups-{tag}-strengths.png", f"{stem}: preference strengths")
        lines += [f"### {stem}", "", "| group | runs | Q | W | B | acc |", "|---|---|---|---|---|---|"]
        for g, ss in scores.items():
            cells = [
                f"{m:.4f} ± {sd:.4f}" for m, sd in (spread([s[k] for s in ss]) for k in ("Q", "W", "B", "accuracy"))
            ]
            lines.append(f"| {g} | {len(ss)} | " + " | ".join(cells) + " |")
        lines += ["", f"![Q and B]({'groups-' + tag}.png)", "", f"![strengths]({'groups-' + tag}-strengths.png)", ""]
        for g, ss in scores.items():
            summed = {
                "confusion": np.sum([s["confusion"] for s in ss], axis=0).tolist(),
                "strategies": ss[0]["strategies"],
            }
            png = f"groups-{tag}-{g.replace('/', '_')}-confusion.png"
            plot_confusion(summed, out / png, f"{g} / {stem}: confusion summed over {len(ss)} runs")
            lines += [f"![{g} confusion]({png})", ""]
    return lines


# ---------------------------------------------------------------- report
def pred_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "eval").glob("pred-*.jsonl")) if (run_dir / "eval").is_dir() else []


def run_report(run_dirs: list[Path], out: Path, sset: StrategySet, groups: dict[str, list[Path]] | None = None) -> Path:
    """report.md + PNGs in `out` for every run's eval/pred-*.jsonl and metrics.jsonl; with `groups`
    (name -> runs, e.g. a method's seeds) also the groups side by side (group_section)."""
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = list(run_dirs) + [r for rs in (groups or {}).values() for r in rs if r not in run_dirs]
    table, sections = [], []
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise DataError(run, None, None, "no such run folder")
        tag = run.name
        sec = [f"## {tag}", f"`{run}`", ""]
        metrics = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
        if metrics and plot_curves(metrics, out / f"{tag}-curves.png", f"{tag}: training curves"):
            sec += [f"![training curves]({tag}-curves.png)", ""]
        preds = pred_files(run)
        if not preds and not metrics:
            raise DataError(run, None, None, "neither eval/pred-*.jsonl nor metrics.jsonl: nothing to report")
        for p in preds:
            s = score_file(p, sset)
            name = f"{tag}-{p.stem}"
            plot_confusion(s, out / f"{name}-confusion.png", f"{tag} / {p.name}")
            plot_bars(s, out / f"{name}-strategies.png", f"{tag} / {p.name}")
            atomic_write_text(out / f"{name}.json", json.dumps(s, indent=2))
            mode = read_pred(p, sset)[0].get("mode", "")
            text = s.get("text", {})
            table.append(
                [
                    tag,
                    p.name,
                    mode,
                    s["n"],
                    s["Q"],
                    s["W"],
                    s["B"],
                    s["accuracy"],
                    s["unknown"],
                    *[text.get(k) for k in TEXT_KEYS],
                ]
            )
            sec += [
                f"### {p.name}",
                "",
                "```",
                format_scores(s),
                "```",
                "",
                f"![confusion]({name}-confusion.png)",
                "",
                f"![strategies]({name}-strategies.png)",
                "",
            ]
        sections.append("\n".join(sec))
    head = ["run", "predictions", "mode", "turns", "Q", "W", "B", "acc", "unknown", *TEXT_KEYS]

    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))

    lines = [
        "# cso_dist evaluation report",
        "",
        "Q = macro-F1, W = weighted-F1 of the predicted strategy; B = preference bias (std of the "
        "Bradley-Terry strengths, lower is better); text metrics on generated replies (BLEU 0-100, "
        "ROUGE-L F 0-100, Distinct-n, mean length in words).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    if groups:
        lines += [""] + group_section(groups, out, sset)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n")
    return report
