"""What a model folder is, by content: the sha256 of its files, memoised by (path, size, mtime_ns), and a short key
over its weights. The reference cache keys on it, PRED files and MCTS trees record it, so that results made by
one model are never taken for another's."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from cso_dist.util.errors import CsoError
from cso_dist.util.io import atomic_write_text, sha256_file
from cso_dist.models.load import ADAPTER_CONFIG, adapter_base_path, is_adapter_dir


def short(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:16]


class FileHashes:
    """sha256 of files, memoised by (absolute path, size, mtime_ns) in a small JSON file."""

    def __init__(self, memo: Path | None):
        self.memo, self.entries, self.dirty = memo, {}, False
        if memo is not None and memo.is_file():
            try:
                self.entries = json.loads(memo.read_text())
            except (json.JSONDecodeError, OSError):
                self.entries = {}

    def get(self, path: Path) -> str:
        st = path.stat()
        k = str(path.resolve())
        e = self.entries.get(k)
        if isinstance(e, dict) and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns:
            return e["sha256"]
        digest = sha256_file(path)
        self.entries[k] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.memo is not None and self.dirty:
            with contextlib.suppress(OSError):
                atomic_write_text(self.memo, json.dumps(self.entries, indent=1, sort_keys=True))
            self.dirty = False


def files_digest(folder: Path, files: list[Path], hashes: FileHashes) -> str:
    """Short key over the files' names (relative to `folder`, so a copied folder keys alike) and contents."""
    return short(json.dumps([[f.relative_to(folder).as_posix(), hashes.get(f)] for f in files]))


def model_files(folder: Path) -> list[Path]:
    weights = sorted(p for pat in ("*.safetensors", "*.bin") for p in folder.glob(pat) if p.is_file())
    if not weights:
        raise CsoError(f"model '{folder}': no *.safetensors or *.bin weight files")
    cfg = folder / "config.json"
    return ([cfg] if cfg.is_file() else []) + weights


def model_key(path: str | Path, memo: Path | None = None) -> str:
    """The content key of a model folder: its config and weights; for a LoRA adapter folder, the adapter's
    config and weights plus its base model's key. File hashes are memoised in `memo` (a JSON file)."""
    hashes = FileHashes(memo)
    key = _key(Path(path), hashes)
    hashes.save()
    return key


def _key(path: Path, hashes: FileHashes) -> str:
    if is_adapter_dir(path):
        files = [path / ADAPTER_CONFIG] + sorted(
            p for pat in ("adapter_model*.safetensors", "adapter_model*.bin") for p in path.glob(pat)
        )
        return short(files_digest(path, files, hashes) + _key(adapter_base_path(path), hashes))
    return files_digest(path, model_files(path), hashes)
