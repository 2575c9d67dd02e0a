"""Reference log-prob cache: a stage of its own (`cso-dist precompute`), content-addressed and resumable."""

from cso_dist.refcache.cache import (
    PrecomputeReport,
    cache_status,
    ensure_reference,
    export_cache,
    load_reference,
    precompute,
    read_manifest,
    run_precompute,
)
from cso_dist.refcache.key import (
    FORMAT_VERSION,
    KEY_COMPONENTS,
    LAYOUT_VERSION,
    cache_key,
    cache_root,
    reference_kind,
    reference_finetune,
    split_dir,
)

__all__ = [
    "FORMAT_VERSION",
    "KEY_COMPONENTS",
    "LAYOUT_VERSION",
    "PrecomputeReport",
    "cache_key",
    "cache_root",
    "cache_status",
    "ensure_reference",
    "export_cache",
    "load_reference",
    "reference_kind",
    "precompute",
    "read_manifest",
    "reference_finetune",
    "run_precompute",
    "split_dir",
]
