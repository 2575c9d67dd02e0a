import pytest

from cso_dist.config import load_config, parse_overrides
from cso_dist.util.errors import ConfigError


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  negatives: 5\n  source: escpro\nmodel:\n  lora_target_modules: [q_proj]\n")
    cfg = load_config(p, parse_overrides(["--data.seed", "7", "--run.out_dir=x/y", "--model.lora_dropout", "0"]))
    assert (cfg.data.negatives, cfg.data.source, cfg.data.seed) == (5, "escpro", 7)
    assert cfg.run.out_dir == "x/y" and cfg.model.lora_dropout == 0.0
    assert cfg.model.lora_target_modules == ["q_proj"]
    assert load_config(None, parse_overrides(["--train.lr", "1e-6"])).train.lr == 1e-6  # YAML 1.1 reads a string
    assert load_config(None, {"model.lora_target_modules": "q_proj,v_proj"}).model.lora_target_modules == [
        "q_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"data.negativs": 3}, "unknown key 'data.negativs' (did you mean 'data.negatives'?)"),
        ({"dta.seed": 3}, "unknown key 'dta'"),
        ({"data.negatives": "abc"}, "data.negatives: expected an integer"),
        ({"data.negatives": True}, "data.negatives: expected an integer"),
        ({"data.negatives": -1}, "data.negatives: must be >= 0"),
        ({"data.source": "esc"}, "data.source: 'esc' is not one of"),
        ({"data.aliases": "yes please"}, "data.aliases: expected true/false"),
        ({"model.precision": "fp8"}, "model.precision"),
        ({"data": 3}, "data: expected a section"),
    ],
)
def test_invalid_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["--negatives", "3"])


def test_every_key_has_help_and_the_sections_form_families():
    import dataclasses

    from cso_dist.config import FAMILIES, TRAINING_SECTIONS, Config, TrainingConfig

    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"
    assert TRAINING_SECTIONS == tuple(f.name for f in dataclasses.fields(TrainingConfig))
    assert set(FAMILIES["all"]) == {f.name for f in dataclasses.fields(Config)}
    for family, sections in FAMILIES.items():
        assert set(sections) <= set(FAMILIES["all"]), family
    # the search settings have one home: MctsConfig inherits them
    from cso_dist.mcts.search import SearchConfig, SearchSettings

    names = {f.name for f in dataclasses.fields(SearchSettings)}
    assert names <= {f.name for f in dataclasses.fields(cfg.mcts)}
    assert all(getattr(cfg.mcts, n) == getattr(SearchConfig(), n) for n in names)


def test_generated_flags_are_dotted_overrides_with_help_and_validation(capsys):
    from cso_dist.cli import build_parser, main
    from cso_dist.commands import _config

    parser = build_parser()
    args, extra = parser.parse_known_args(
        ["data", "build", "--from", "trl", "--negatives", "5", "--aliases", "--out", "x"]
    )
    cfg = _config(args, extra, "data")
    assert (cfg.data.source, cfg.data.negatives, cfg.data.aliases) == ("trl", 5, True)
    args, extra = parser.parse_known_args(["data", "build", "--out", "x"])
    assert _config(args, extra, "data").data.negatives == 3  # an absent flag leaves the default
    args, extra = parser.parse_known_args(["launch", "sbatch", "--time", "30", "--gpus-per-node", "0"])
    cfg = _config(args, extra, "launch")
    assert (cfg.slurm.time_min, cfg.slurm.gpus_per_node) == (30, 0)

    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    out = capsys.readouterr().out
    assert "data.negatives; default 3" in out and "non-preferred options per supporter turn" in out
    assert main(["data", "build", "--negatives", "x", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == "cso-dist: error: config: data.negatives: expected an integer, got 'x'"
    assert main(["data", "build", "--negatives", "-1", "--out", "x"]) == 2
    assert "data.negatives: must be >= 0" in capsys.readouterr().err


def test_an_override_of_a_section_the_command_does_not_read_is_refused(capsys):
    from cso_dist.cli import main

    assert main(["train", "--slurm.nodes", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--slurm.nodes: this command does not read the slurm section" in err
    assert main(["data", "build", "--train.lr", "1e-3", "--out", "x"]) == 2
    assert "does not read the train section" in capsys.readouterr().err


def test_a_config_extends_its_base_files(tmp_path, capsys):
    """`base:` (a file or a list, relative to the file): merged in order under the file's own keys, section by
    section; bases of bases too. `config show` prints the resolved whole."""
    from cso_dist.cli import main

    (tmp_path / "b1.yaml").write_text("train:\n  lr: 1.0e-5\n  beta: 0.2\nmodel:\n  lora_target_modules: [q_proj]\n")
    (tmp_path / "b2.yaml").write_text("base: b1.yaml\ntrain:\n  beta: 0.3\n  epochs: 3\n")
    (tmp_path / "c.yaml").write_text("base: [b2.yaml]\ntrain:\n  epochs: 5\nrun:\n  out_dir: here\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.lr, cfg.train.beta, cfg.train.epochs, cfg.run.out_dir) == (1e-5, 0.3, 5, "here")
    assert cfg.model.lora_target_modules == ["q_proj"]
    assert main(["config", "show", "--config", str(tmp_path / "c.yaml")]) == 0
    shown = capsys.readouterr().out
    assert "base:" not in shown and "beta: 0.3" in shown and "epochs: 5" in shown and "lr: 1.0e-05" in shown


@pytest.mark.parametrize(
    "text,needle",
    [
        ("base: nowhere.yaml\n", "c.yaml: base: nowhere.yaml: no such file"),
        ("base: c.yaml\n", "c.yaml: base: c.yaml includes itself"),
        ("base: 3\n", "c.yaml: base: expected a file name or a list of them"),
        ("base: [b.yaml]\n", "b.yaml: unknown key 'trian'"),
    ],
)
def test_a_bad_base_is_one_line_naming_the_file(tmp_path, text, needle):
    (tmp_path / "b.yaml").write_text("trian:\n  lr: 1\n")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_config_reference_in_docs_is_current():
    """docs/config.md is what `cso-dist config reference` writes: every key, its type, default and help."""
    from conftest import REPO

    from cso_dist.config.reference import reference_markdown

    text = reference_markdown()
    assert (REPO / "docs" / "config.md").read_text() == text, (
        "docs/config.md is stale: run `cso-dist config reference --out docs/config.md`"
    )
    assert "| `model.revision` |" in text and "| `train.lr` |" in text


def test_a_renamed_key_is_read_under_its_new_name_with_a_note(tmp_path, capsys):
    """model.method (full / lora / qlora) is now model.finetune: a config file or an override that still says
    model.method loads, and says so once; both names at once are refused; an old run's saved config compares
    under the new name, so a resume does not see a change."""
    from cso_dist.train.rundir import config_changes

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  method: lora\n")
    capsys.readouterr()
    assert load_config(old).model.finetune == "lora"
    assert load_config(None, {"model.method": "qlora"}).model.finetune == "qlora"
    err = capsys.readouterr().err
    assert err.count("cso-dist: note: model.method is now model.finetune (the old name still works)") == 2, err
    with pytest.raises(ConfigError, match="model.method: the old name of model.finetune; give only the new one"):
        load_config(None, {"model.method": "lora", "model.finetune": "full"})
    saved = load_config(None, {"model.finetune": "lora"}).to_dict()
    saved["model"]["method"] = saved["model"].pop("finetune")  # what a run folder written before the rename holds
    assert config_changes(saved, load_config(None, {"model.finetune": "lora"}).to_dict()) == ([], [])
    assert config_changes(saved, load_config(None, {"model.finetune": "full"}).to_dict())[0] == ["model.finetune"]


def test_the_scorer_settings_moved_from_pack_are_read_at_their_new_place(tmp_path, capsys):
    """Issue 42: pack.attention and pack.logit_chunk are the scorer's (scorer.attention, scorer.logit_chunk). A file
    or an override at the old place loads with a note; both places at once are refused; a run folder written
    before the move compares under the new keys (its finished runs stay finished)."""
    from cso_dist.train.rundir import config_changes

    old = tmp_path / "old.yaml"
    old.write_text("pack:\n  layout: trie\n  attention: dense\n  logit_chunk: 64\n")
    capsys.readouterr()
    cfg = load_config(old)
    assert (cfg.scorer.attention, cfg.scorer.logit_chunk, cfg.pack.layout) == ("dense", 64, "trie")
    assert load_config(None, {"pack.attention": "tree"}).scorer.attention == "tree"
    err = capsys.readouterr().err
    assert "cso-dist: note: pack.attention is now scorer.attention (the old key still works)" in err, err
    assert "cso-dist: note: pack.logit_chunk is now scorer.logit_chunk (the old key still works)" in err, err
    with pytest.raises(ConfigError, match="pack.attention: the old place of scorer.attention; give only the new one"):
        load_config(None, {"pack.attention": "tree", "scorer.attention": "dense"})
    saved = load_config(None, {"scorer.attention": "tree"}).to_dict()
    scorer = saved.pop("scorer")
    saved["pack"].update(scorer)  # what a run folder written before the move holds
    assert config_changes(saved, load_config(None, {"scorer.attention": "tree"}).to_dict()) == ([], [])
    assert config_changes(saved, load_config(None, {"scorer.attention": "dense"}).to_dict())[0] == ["scorer.attention"]


def test_a_key_only_another_method_reads_is_refused():
    """Each method declares the train keys it reads (cso_dist.losses.Method.keys) and the layouts that serve it."""
    with pytest.raises(ConfigError, match="train.gamma_beta_ratio: read by simpo only, and train.method is dpo"):
        load_config(None, {"train.method": "dpo", "train.gamma_beta_ratio": 0.3})
    assert load_config(None, {"train.method": "simpo", "train.gamma_beta_ratio": 0.3}).train.gamma_beta_ratio == 0.3
    assert load_config(None, {"train.method": "dpo", "train.gamma_beta_ratio": 0.55}).train.method == "dpo"  # default
    with pytest.raises(ConfigError, match="pack.layout: 'pair' does not serve kto"):
        load_config(None, {"train.method": "kto", "pack.layout": "pair"})
    with pytest.raises(ConfigError, match="model.path: required"):
        from cso_dist.inputs import model_dir

        model_dir(load_config(None, {}))


def test_the_former_bf16_on_amx_key_is_read_as_cpu_bf16(capsys):
    assert load_config(None, {"study.bf16_on_amx": False}).study.cpu_bf16 is False
    assert "study.bf16_on_amx is now study.cpu_bf16" in capsys.readouterr().err


def test_speed_settings_that_would_be_ignored_are_refused():
    """pack.bucket pads flex's rows only; train.compile needs rows of a few lengths (flex) and the torch engine;
    train.fused_adamw fuses torch's AdamW only."""
    assert load_config(None, {"pack.bucket": 512}).pack.bucket == 512  # auto: flex on CUDA
    assert load_config(None, {"scorer.attention": "flex", "pack.bucket": 0}).pack.bucket == 0
    with pytest.raises(
        ConfigError, match="pack.bucket: only flex attention over trie rows reads it, and scorer.attention"
    ):
        load_config(None, {"scorer.attention": "tree", "pack.bucket": 512})
    with pytest.raises(ConfigError, match=r"pack.bucket: only flex .*pack.layout pair"):
        load_config(None, {"pack.layout": "pair", "pack.bucket": 512})
    with pytest.raises(ConfigError, match="pack.bucket: must be >= 0"):
        load_config(None, {"pack.bucket": -1})
    assert load_config(None, {"train.compile": True}).train.compile
    with pytest.raises(ConfigError, match="train.compile: compiled layers need rows of a few lengths"):
        load_config(None, {"train.compile": True, "scorer.attention": "tree"})
    with pytest.raises(ConfigError, match="train.compile: ZeRO gathers and releases"):
        load_config(None, {"train.compile": True, "dist.engine": "deepspeed"})
    assert load_config(None, {"train.fused_adamw": True}).train.fused_adamw
    with pytest.raises(ConfigError, match="train.fused_adamw: fuses torch's AdamW, and train.optimizer is adamw8bit"):
        load_config(None, {"train.fused_adamw": True, "train.optimizer": "adamw8bit"})
    with pytest.raises(ConfigError, match="train.fused_adamw: DeepSpeed's optimizer offload runs its own CPU Adam"):
        load_config(
            None, {"train.fused_adamw": True, "dist.engine": "deepspeed", "dist.deepspeed_config": "zero3_offload"}
        )


def test_fused_adamw_takes_effect():
    import torch

    from cso_dist.engines.common import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    assert make_optimizer(params, load_config(None, {"train.fused_adamw": True})).defaults["fused"] is True
    assert not make_optimizer(params, load_config(None, {})).defaults["fused"]
