"""`data fetch esconv`: download ESConv's HF split from the Hugging Face Hub (needs network)."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import shutil
from pathlib import Path

from cso_dist.util.errors import CsoError

DATASETS = ("esconv",)  # `data fetch`: what can be downloaded
ESCONV_REPO = "thu-coai/esconv"
ESCONV_SPLITS = {"train.json": "train.jsonl", "valid.json": "valid.jsonl", "test.json": "test.jsonl"}


def fetch_esconv(dest: Path, timeout: float | None = None) -> list[Path]:
    """Files land in dest/esconv/{train,valid,test}.jsonl; each written atomically. Every call to the Hub waits at
    most `timeout` s (default huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT, 10 s unless set)."""
    import httpx2
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT) if timeout is None else timeout
    out_dir = dest / "esconv"
    hint = f"Offline? Copy train.jsonl, valid.jsonl and test.jsonl of ESConv's HF split into {out_dir} by hand"
    endpoint = constants.ENDPOINT.rstrip("/")
    try:  # one quick probe instead of the hub client's minute of retries
        urllib.request.urlopen(endpoint, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        if isinstance(why, TimeoutError) or "timed out" in str(why):
            why = f"no answer within {timeout:g} s, HF_HUB_DOWNLOAD_TIMEOUT"
        raise CsoError(f"data fetch esconv: cannot reach the Hugging Face Hub at {endpoint} ({why}). {hint}") from None
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for remote, local in ESCONV_SPLITS.items():
        try:
            cached = hf_hub_download(ESCONV_REPO, remote, repo_type="dataset", etag_timeout=timeout)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, httpx2.HTTPError) as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CsoError(
                f"data fetch esconv: could not download {ESCONV_REPO}/{remote} from the Hugging Face "
                f"Hub ({type(e).__name__}: {reason}). {hint}"
            ) from None
        tmp = out_dir / f".{local}.tmp"
        shutil.copyfile(cached, tmp)
        os.replace(tmp, out_dir / local)
        written.append(out_dir / local)
    return written
