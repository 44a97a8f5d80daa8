import pytest

from yolo_q.config import ConfigError, load_config, save_config


def test_defaults_and_overrides(repo_root):
    cfg = load_config(repo_root / "configs/yolov6s.yaml", ["train.epochs=3", "model.width_multiple=0.25"])
    assert cfg.train.epochs == 3 and cfg.model.width_multiple == 0.25
    assert cfg.model.name == "yolov6s"  # from the file
    assert cfg.model.depth_multiple == 0.33  # inherited through _base_
    assert cfg.train.loss.iou_type == "giou"  # s overrides n's siou


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.epoch" in msg and "epochs" in msg
    assert "\n" not in msg


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  width_multiple: wide\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid key 'model.width_multiple'"):
        load_config(p)


def test_override_errors():
    with pytest.raises(ConfigError, match="command line.*train.lr0"):
        load_config(None, ["train.lr0=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr0"])
    with pytest.raises(ConfigError, match="(?i)did you mean.*ema_decay"):
        load_config(None, ["train.ema_decy=0.9"])


def test_base_error_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  img_sise: 320\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="base.yaml: invalid key 'data.img_sise'.*img_size"):
        load_config(tmp_path / "child.yaml")


def test_base_cycle_and_missing(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trip(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs/yolov6m.yaml", ["train.epochs=7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg


def test_invalid_choice_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid value 'sdg' for 'train.optimizer'.*did you mean 'sgd'"):
        load_config(None, ["train.optimizer=sdg"])
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  block: repvgq\n")
    with pytest.raises(ConfigError, match=r"x.yaml: invalid value 'repvgq' for 'model.block'"):
        load_config(p)
