"""`cso-dist export`: a checkpoint folder, or a run folder's latest checkpoint, to an HF folder, its weights
consolidated by the engine that wrote them (cso_dist.engines.build.checkpoint_weights) and written as a run's final
model is (cso_dist.engines.final)."""

from __future__ import annotations

from pathlib import Path

from cso_dist.config import TrainingConfig, load_config
from cso_dist.engines.build import checkpoint_weights
from cso_dist.engines.checkpoint import list_checkpoints
from cso_dist.engines.final import model_from_state_dict, save_final
from cso_dist.inputs import model_dir, tokenizer_dir
from cso_dist.models import load_tokenizer
from cso_dist.train.rundir import RUN_CONFIG, run_config_file
from cso_dist.util.errors import CsoError


def _run_config(ckpt: Path) -> TrainingConfig:
    """The resolved config of the run a checkpoint belongs to (<run>/checkpoints/step-N)."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        f = run_config_file(d)
        if f.is_file():
            return load_config(f, {})
    raise CsoError(f"{ckpt}: no config of its run found (expected <run>/{RUN_CONFIG} beside checkpoints/)")


def export_checkpoint(ckpt: Path, out: Path, final: str | None = None) -> Path:
    """`cso-dist export`: a checkpoint folder, or a run folder (its latest checkpoint), to an HF folder (the weights
    consolidated on this host by the engine that wrote them; LoRA: `final` merged or adapter, default the run's)."""
    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        done = list_checkpoints(ckpt / "checkpoints") or list_checkpoints(ckpt)
        if not done:
            raise CsoError(f"{ckpt}: neither a checkpoint (step-NNNNNNN with state.json) nor a run folder with one")
        ckpt = done[-1]
    cfg = _run_config(ckpt)
    sd, engine = checkpoint_weights(ckpt)
    model = model_from_state_dict(sd, cfg)
    tok = load_tokenizer(tokenizer_dir(model_dir(cfg)))
    save_final(model, cfg, out, tok, final)
    print(f"exported {ckpt} ({engine} engine, {cfg.model.finetune}) -> {out}")
    return Path(out)
