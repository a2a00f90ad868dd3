import pytest

from moe_dist.config import Config, load_config, parse_override
from moe_dist.errors import ConfigError
from conftest import REPO


def test_quickstart_loads_and_overrides():
    cfg = load_config(f"{REPO}/configs/quickstart.yaml", ["train.max_steps=50", "run.dir=/tmp/r1"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 50 and cfg.run.dir == "/tmp/r1"
    assert cfg.moe.top_k == 2 and cfg.data.source == "sotu"


def test_override_values_are_yaml():
    assert parse_override("moe.capacity_factor=null") == ("moe.capacity_factor", None)
    assert parse_override("optim.lr=0.5") == ("optim.lr", 0.5)
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert parse_override("logging.progress=false") == ("logging.progress", False)
    cfg = load_config(None, ["moe.capacity_factor=0", "optim.lr=1"])
    assert cfg.moe.capacity_factor_for(True) is None and cfg.optim.lr == 1.0  # int accepted for a float key


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=64", "unknown key 'model.d_modle' (did you mean model.d_model?)"),
        ("modell.d_model=64", "unknown key 'modell'"),
        ("model.d_model=abc", "model.d_model: expected an integer, got 'abc'"),
        ("model.d_model=64.5", "model.d_model: expected an integer, got 64.5"),
        ("logging.progress=1", "logging.progress: expected true or false, got 1"),
        ("model.activation=tanh", "model.activation: expected one of ['swiglu', 'relu', 'gelu'], got 'tanh'"),
        ("train.activation_checkpoint=yes",
         "train.activation_checkpoint: expected one of ['none', 'full'], got True (YAML reads yes, no, on and off as booleans)"),
        ("moe.top_k=9", "moe.top_k: top_k=9 exceeds moe.num_experts=8"),
        ("moe.capacity_factor=-0.5", "moe.capacity_factor: must be >= 0 (0 or null = dropless), got -0.5"),
        ("model.d_model=130", "model.d_model: d_model=130 is not divisible by model.n_heads=4"),
        ("train.max_steps=0", "train.max_steps: must be >= 1"),
        ("optim.min_lr=1.0", "optim.min_lr: must be in [0, optim.lr]"),
        ("data.val_fraction=1.5", "data.val_fraction: must be in (0, 1)"),
        ("run.seed=-1", "run.seed: must be in [0, 2**32 - 1]"),
        ("run.seed=4294967296", "run.seed: must be in [0, 2**32 - 1]"),
        ("model.n_layers", "is not of the form section.key=value"),
        ("model=3", "override 'model=3': the key must be section.key"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_moe_every_must_divide_the_moeut_group():
    with pytest.raises(ConfigError, match=r"moe.every: every=2 does not divide model.group_size=3"):
        load_config(None, ["model.n_layers=6", "model.group_size=3", "moe.every=2"])
    load_config(None, ["model.n_layers=8", "model.group_size=4", "moe.every=2"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: /nonexistent.yaml"):
        load_config("/nonexistent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  n_headz: 4\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'model.n_headz'"):
        load_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(str(bad))
    # YAML keeps the last of two equal keys: the first train section would be lost whole.
    bad.write_text("train:\n  max_steps: 5\nmodel:\n  d_model: 32\ntrain:\n  micro_batch_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value) == f"{bad}: duplicate key 'train' at line 5 (first at line 1)"
    bad.write_text("train:\n  max_steps: 5\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: duplicate key 'max_steps' at line 3 \(first at line 2\)$"):
        load_config(str(bad))


def test_every_shipped_config_loads():
    import glob

    paths = sorted(glob.glob(f"{REPO}/configs/*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        load_config(path)
