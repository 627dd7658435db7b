"""configs/facecam.py through load_config: variants, overrides, clear errors."""

import importlib.util

import pytest

from facecam_jax.config_file import DEFAULT_CONFIG, load_config


def _config_module():
    spec = importlib.util.spec_from_file_location("facecam_config_under_test", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_and_variant_overrides():
    mini = load_config()
    assert mini.variant == "mini" and mini.model.dit == "tiny" and mini.data.frames == 17
    paper = load_config(f"{DEFAULT_CONFIG}:nersemble,train.steps=5,frames=21")
    assert paper.model.dit == "wan2.2-i2v-a14b" and paper.optimizer.lr == 5e-5
    assert paper.train.steps == 5 and paper.data.frames == 21 and paper.sample.num_steps == 50


def test_bad_overrides_and_paths_are_clear_errors(tmp_path):
    module = _config_module()
    config = module.base_config()
    config.sample.steps = 1  # a second section with a field named like train.steps
    with pytest.raises(KeyError, match="ambiguous"):
        module.set_field(config, "steps", 3)
    with pytest.raises(KeyError, match="no field"):
        load_config("data.framez=3")
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
