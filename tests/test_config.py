"""Config: defaults < YAML < dotted overrides; unknown keys fail with the valid keys listed."""

import pytest
from pydantic import ValidationError

from pathloop.config import ConfigError, ModelConfig, load_config, updated
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


def test_one_gpu_loop_preset_loads_and_says_it_is_not_measured():
    from pathlib import Path

    from pathloop.pipeline import LoopConfig

    path = Path("jobs/configs/loop.gpu1.yaml")
    cfg = load_config(LoopConfig, path)
    assert cfg.pretrain.model.preset == "paper" and cfg.data.size == 64
    assert cfg.pretrain.train.compile == "auto" and cfg.finetune.train.compile is False
    assert cfg.pretrain.scaling.use_gpu and cfg.round.use_gpu and cfg.evaluate.use_gpu
    assert "NOT MEASURED" in path.read_text()


def test_string_fields_keep_override_text():
    from pathloop.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, ["feedback_round=7", "name=1e3", "reward_model=null"])
    assert cfg.feedback_round == "7" and cfg.name == "1e3" and cfg.reward_model is None


def test_updated_revalidates():
    cfg = PretrainConfig()
    with pytest.raises(ConfigError, match=r"train\.steps.*greater than 0"):
        updated(cfg, train={"steps": -5})
    with pytest.raises(ConfigError, match="max_failures"):
        updated(cfg, max_failures="many")
    with pytest.raises(ConfigError, match=r"model\.block_out_channels"):
        updated(cfg, model={"block_out_channels": "wide"})


def test_updated_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        updated(PretrainConfig(), stepz=3)
    assert "stepz" in str(e.value) and "valid keys" in str(e.value) and "workdir" in str(e.value)
    with pytest.raises(ConfigError) as e:
        updated(PretrainConfig(), optim={"lrr": 1})
    assert "optim.lrr" in str(e.value) and "ema_decay" in str(e.value)


def test_updated_merges_nested_and_replaces_models():
    from pathloop.pipeline import LoopConfig

    cfg = load_config(PretrainConfig, None, ["data.split=test", "model.block_out_channels=[8,16]"])
    new = updated(cfg, workdir="w", data={"shards": "s"}, optim={"lr": 2e-4})
    assert (new.workdir, new.data.shards, new.data.split) == ("w", "s", "test")  # merged
    assert new.optim.lr == pytest.approx(2e-4) and new.optim.grad_clip == cfg.optim.grad_clip
    assert new.model.block_out_channels == (8, 16)  # a tuple stays a tuple
    assert cfg.workdir != "w" and cfg.data.shards != "s"  # the original is untouched
    assert updated(new, model=ModelConfig()).model.block_out_channels is None  # a model replaces
    loop = updated(LoopConfig(), pretrain={"train": {"steps": 3}})
    assert loop.pretrain.train.steps == 3 and loop.pretrain.train == updated(
        LoopConfig().pretrain.train, steps=3
    )
    assert PretrainConfig.model_validate(new.model_dump(mode="json")) == new


def test_updated_same_class_and_frozen():
    from pathloop.finetune import FinetuneConfig

    cfg = FinetuneConfig()
    new = updated(cfg, resume=True)
    assert type(new) is FinetuneConfig and new.resume and not cfg.resume
    assert updated(cfg) == cfg
    with pytest.raises(ValidationError):
        new.resume = False
