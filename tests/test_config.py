import dataclasses
import inspect
from pathlib import Path

import pytest

from metaloop.algorithms import LEARNERS
from metaloop.config import Config, ConfigError, config_to_yaml, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.algorithm.name == "protonet" and config.data.name == "glyphs"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    config = load_config(path)
    assert config.run_dir.startswith("runs/")


def test_snell_training_setup_in_the_omniglot_recipes():
    for name, ways, shots in [("5w1s", 5, 1), ("5w5s", 5, 5), ("20w1s", 20, 1), ("20w5s", 20, 5)]:
        config = load_config(Path("configs") / f"protonet_omniglot_{name}.yaml")
        assert (config.train.ways, config.train.queries, config.train.shots) == (60, 5, shots)
        assert (config.eval.ways, config.eval.shots) == (ways, shots)
        assert config.data.name == "omniglot" and config.data.image_size == 28


def test_every_omniglot_recipe_tests_the_setting_its_name_gives():
    """``<learner>_omniglot_<W>w<S>s.yaml`` tests W-way S-shot; the papers' learners have all four."""
    for path in CONFIGS:
        stem = path.stem.split("_")
        if stem[1] == "omniglot":
            ways, shots = stem[2].removesuffix("s").split("w")
            config = load_config(path)
            assert (config.eval.ways, config.eval.shots) == (int(ways), int(shots)), path.name
    for learner in ("protonet", "maml", "fomaml", "metasgd", "reptile", "siamese", "attention"):
        for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
            assert (Path("configs") / f"{learner}_omniglot_{setting}.yaml").is_file(), (learner, setting)


def test_overrides_are_parsed_as_yaml():
    config = load_config(overrides=["train.steps=7", "train.lr=0.01", "data.data_dir=/tmp/x", "seed=3"])
    assert config.train.steps == 7 and config.train.lr == 0.01 and config.seed == 3
    assert config.data.data_dir == "/tmp/x"


def test_int_is_accepted_for_float_and_none_for_optional():
    config = load_config(overrides=["train.lr=1", "train.early_stop_patience=null"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) 'lr_dacay' in 'train'; valid: ways, shots"
    ):
        load_config(overrides=["train.lr_dacay=0.5"])


def test_unknown_section():
    with pytest.raises(ConfigError, match="'trian' at the top level"):
        load_config(overrides=["trian.steps=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", "train.steps: expected int, got str 'ten'"),
        ("train.steps=true", "train.steps: expected an integer, got True"),
        ("train.lr=[1]", "train.lr: expected float, got list"),
        ("train=3", "train: expected a mapping"),
        ("nonsense", "is not of the form key.sub=value"),
    ],
)
def test_wrong_types_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(overrides=[override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_yaml_round_trip(tmp_path):
    config = load_config(overrides=["train.steps=11", "eval.ways=3"])
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_names_a_learner_and_only_its_hyper_parameters(path):
    algorithm = load_config(path).algorithm
    assert algorithm.name in LEARNERS
    accepted = inspect.signature(LEARNERS[algorithm.name]).parameters
    keys = {k for k, v in dataclasses.asdict(algorithm).items() if k != "name" and v is not None}
    assert keys <= set(accepted), keys - set(accepted)
