import pytest

from cso_dist.config import load_config, parse_overrides
from cso_dist.errors import ConfigError


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
