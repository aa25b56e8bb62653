"""Config: defaults < YAML < dotted overrides; unknown keys fail with the valid keys listed."""

import pytest
from pydantic import ValidationError

from pathloop.config import ConfigError, load_config
from pathloop.pretrain import PretrainConfig


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.001\ntrain:\n  steps: 10\n")
    cfg = load_config(PretrainConfig, p, ["optim.lr=2e-4", "model.preset=small"])
    assert cfg.optim.lr == pytest.approx(2e-4)  # override beats YAML
    assert cfg.train.steps == 10  # YAML beats default
    assert cfg.model.preset == "small"
    assert cfg.optim.ema_decay == pytest.approx(0.9999)  # default kept


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, ["optim.lrr=1"])
    msg = str(e.value)
    assert "lrr" in msg and "valid keys" in msg and "lr" in msg and "ema_decay" in msg


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, p)
    assert "train.stepz" in str(e.value) and "steps" in str(e.value)


def test_bad_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(PretrainConfig, None, ["train.steps=-1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(PretrainConfig, None, ["optim.lr"])


def test_frozen_and_dict_round_trip():
    cfg = load_config(PretrainConfig, None, ["train.steps=7"])
    with pytest.raises(ValidationError):
        cfg.train.steps = 3  # frozen
    again = PretrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg  # crosses process boundaries as a dict


def test_tiny_preset_file_loads():
    cfg = load_config(PretrainConfig, "jobs/configs/pretrain.tiny.yaml")
    assert cfg.model.preset == "tiny" and cfg.train.batch_size % cfg.scaling.num_workers == 0


def test_string_fields_keep_override_text():
    from pathloop.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, ["feedback_round=7", "name=1e3", "reward_model=null"])
    assert cfg.feedback_round == "7" and cfg.name == "1e3" and cfg.reward_model is None
