"""configs/reference/: they load, follow the official recipe, share one data set whose val
images are the demo's, and the data command in benchmarks/reference/README.md regenerates it."""
import pytest

from yolo_q.config import load_config
from yolo_q.ladder import data_command

NAMES = ["yolov6n_repvgg", "yolov6n_repopt_hs", "yolov6n_repopt"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_config_recipe(repo_root, name):
    cfg = load_config(repo_root / "configs" / "reference" / f"{name}.yaml")
    t = cfg.train
    assert (t.batch_size, t.nominal_batch, t.accumulate_warmup, t.ema_buffers) == \
        (16, 64, True, "average")
    assert t.warmup_epochs == 3.0 and t.epochs > cfg.data.augment.close_mosaic_epochs
    assert cfg.data.dataset == f"{cfg.pipeline.synthetic.out}/synthetic.yaml"
    block = {"yolov6n_repvgg": "repvgg", "yolov6n_repopt_hs": "linearadd",
             "yolov6n_repopt": "realvgg"}[name]
    assert cfg.model.block == block
    if name == "yolov6n_repopt":
        hs = load_config(repo_root / "configs" / "reference" / "yolov6n_repopt_hs.yaml")
        assert t.optimizer == "repopt"
        assert cfg.model.scales == f"{hs.train.output_dir}/{hs.train.name}/scales.pt"


def test_reference_data_is_the_demo_distribution(repo_root):
    ref = load_config(repo_root / "configs" / "reference" / "yolov6n_repvgg.yaml").pipeline.synthetic
    demo = load_config(repo_root / "configs" / "demo.yaml").pipeline.synthetic
    assert (ref.size, ref.seed, ref.val, dict(ref.spec)) == (demo.size, demo.seed, demo.val,
                                                             dict(demo.spec))
    cmd = data_command(load_config(repo_root / "configs" / "reference" / "yolov6n_repvgg.yaml"))
    readme = (repo_root / "benchmarks" / "reference" / "README.md").read_text()
    assert cmd in readme
