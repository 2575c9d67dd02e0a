"""Hugging Face `datasets` inputs for the row readers (trl, cso-rows, kto-rows): what TRL users have.

A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: the `data.split` split is
read), or a `.parquet` / `.arrow` file. Rows come out as plain dicts named "row i", like JSON records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from cso_dist.util.errors import DataError

SUFFIXES = (".parquet", ".arrow")


def is_hf_input(path: str | Path) -> bool:
    p = Path(path)
    if p.is_dir():
        return any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    return p.suffix in SUFFIXES and p.is_file()


def _load(p: Path, split: str):
    import datasets  # heavy (pyarrow, pandas): only for these inputs

    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        str(p),
                        None,
                        None,
                        f"no split '{split}' (splits: {', '.join(ds)}); set data.split",
                        "missing-split",
                    )
                ds = ds[split]
            return ds
        if p.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(p))
        return datasets.Dataset.from_file(str(p))
    except DataError:
        raise
    except Exception as e:  # pyarrow / datasets errors on damaged files
        raise DataError(
            str(p), None, None, f"not a readable dataset ({type(e).__name__}: {str(e).splitlines()[0]})", "bad-dataset"
        ) from None


def hf_records(path: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    for i, row in enumerate(_load(Path(path), split)):
        yield f"row {i}", row
