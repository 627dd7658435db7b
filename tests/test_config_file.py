"""configs/facecam.py through load_config: variants, overrides, clear errors."""

import importlib.util

import pytest

from facecam_jax.runtime.config_file import DEFAULT_CONFIG, load_config


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


@pytest.mark.parametrize("override, key", [
    ("width=0", "data.width=0"),
    ("height=40", "data.height=40"),
    ("frames=10", "data.frames=10"),
    ("frames=100001", "data.frames=100001"),
    ("checkpoint_every=0", "train.checkpoint_every=0"),
    ("steps=-5", "train.steps=-5"),
    ("batch_size=0", "data.batch_size=0"),
    ("optimizer.lr=0.0", "optimizer.lr=0.0"),
    ("optimizer.b2=1.0", "optimizer.b2=1.0"),
    ("mesh.data=-1", "at most one size may be -1"),
    ("wild_ratio=1.5", "data.wild_ratio=1.5"),
    ("sample.framing='centred'", "sample.framing='centred'"),
])
def test_bad_numbers_are_one_value_error_naming_the_key(override, key):
    with pytest.raises(ValueError, match="bad config value") as error:
        load_config(f"mini,{override}")
    assert key in str(error.value) and "\n" not in str(error.value)


def test_overrides_of_the_wrong_type_and_typos_name_the_key():
    with pytest.raises(ValueError, match="override steps='many'.*int"):
        load_config("mini,steps=many")
    with pytest.raises(KeyError, match="did you mean 'train.steps'"):
        load_config("mini,stepz=3")
    assert load_config("mini,steps=0").train.steps == 0  # zero steps is allowed: nothing to train


def test_each_enumeration_is_spelled_once_and_checked_where_the_config_loads():
    """The choices live in facecam_jax.options alone: the code that acts on them imports them
    (the same objects), and no module of the package writes one of the tuples out again."""
    import pathlib

    from facecam_jax import options
    from facecam_jax.camera import trajectories
    from facecam_jax.diffusion import solvers
    from facecam_jax.models import quant

    assert solvers.SOLVERS is options.SOLVERS and quant.MODES is options.QUANTIZE
    assert trajectories.FRAMINGS is options.FRAMINGS
    assert options.DEFAULT_CAMERA_KIND == "landmarks" and "landmarks" in options.camera_kinds()
    package = pathlib.Path(options.__file__).parent
    sources = {p: p.read_text() for p in package.rglob("*.py")}
    for name in ("SOLVERS", "CACHES", "OFFLOADS", "CFG_MODES", "QUANTIZE", "FRAMINGS", "EXPERTS", "ASPECTS", "EXTENDS"):
        spelled = repr(getattr(options, name)).replace("'", '"')
        where = [str(p.relative_to(package)) for p, text in sources.items() if spelled in text]
        assert where == ["options.py"], (name, where)
    with pytest.raises(ValueError, match="camera.kind='extrinsics' must be one of 'factorportrait', 'landmarks', 'none', 'plucker', 'recammaster'"):
        load_config("mini,camera.kind=extrinsics")
    with pytest.raises(ValueError, match="sample.solver='heun'.*sample.window_overlap=0"):
        load_config("mini,sample.solver=heun,sample.window_overlap=0")
