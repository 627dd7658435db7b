"""Nothing a run reads is written over: one registry of what a run reads (``paths.read_paths``:
the config file, the config's path-valued keys, the command's own inputs), checked by every
writer (``paths.WRITERS``) before any work; flags pass the rules their config keys pass; a
broken config, calibration or manifest names its file.

Every case that would write runs on copies in tmp_path, so a regression cannot touch the checkout.
"""

import glob
import importlib.util
import os
import re
import shutil

import pytest
from forked_runs import run as _run

from facecam_jax.diffusion.step_cache import load_calibration
from facecam_jax.evaluation.manifest import ManifestError, read_manifest
from facecam_jax.runtime import paths
from facecam_jax.runtime.config_file import DEFAULT_CONFIG, ConfigFileError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every command that writes a file, with the flags naming what it writes.
WRITERS = [
    ("facecam_jax.sample", "--out"),
    ("facecam_jax.sample", "--output_dir"),
    ("facecam_jax.app", "--output_dir"),
    ("facecam_jax.aot", "--json"),
    ("facecam_jax.evaluate", "--out_json"),
    ("facecam_jax.evaluate", "--out_md"),
    ("facecam_jax.camera.preview", "--out"),
    ("facecam_jax.camera.preview", "--save-trajectory"),
    ("facecam_jax.train", "--workdir"),
    ("tools/calibrate_cache.py", "--out"),
    ("tools/convert_wan_checkpoint.py", "--out"),
    ("tools/encode_prompt.py", "--out"),
    ("tools/train_mini_vae.py", "--out"),
    ("tools/make_proxy_head.py", "--out"),
    ("tools/make_mini_dataset.py", "--cache_dir"),
    ("tools/prepare_dataset.py", "--prepared_root"),
]
PATH_SUFFIXES = ("checkpoint", "overlay", "root", "embeddings", "weights", "loras", "calibration")


def _one_error_line(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def _source(writer: str) -> str:
    path = writer if writer.endswith(".py") else writer.replace(".", os.sep) + ".py"
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_every_entry_point_is_a_registered_writer_that_checks_its_outputs():
    assert sorted(WRITERS) == sorted((w, flag) for w, flags in paths.WRITERS.items() for flag in flags)
    entry_points = set()
    for path in glob.glob(os.path.join(ROOT, "facecam_jax", "**", "*.py"), recursive=True) + glob.glob(
            os.path.join(ROOT, "tools", "*.py")):
        with open(path) as f:
            text = f.read()
        main = re.search(r'^if __name__ == "__main__":\n((?:[ \t].*\n?)*)', text, re.M)
        if main and "cli.run" in main.group(1):
            rel = os.path.relpath(path, ROOT)
            entry_points.add(rel if rel.startswith("tools") else rel[:-3].replace(os.sep, "."))
    assert entry_points == set(paths.WRITERS)  # a new command is registered with what it writes
    for writer, flags in paths.WRITERS.items():
        text = _source(writer)
        assert "paths.check_outputs(" in text, writer
        assert all(flag.lstrip("-") in text for flag in flags), writer


def test_every_path_valued_config_key_is_in_the_registry():
    named_like_paths = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            elif key.endswith(PATH_SUFFIXES) and (value is None or isinstance(value, (str, tuple))):
                named_like_paths.add(prefix + key)

    spec = importlib.util.spec_from_file_location("facecam_config_variants", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in module.VARIANTS:  # every variant: a path key may exist in one only
        walk(load_config(variant))
    assert named_like_paths <= set(paths.CONFIG_PATH_KEYS), named_like_paths - set(paths.CONFIG_PATH_KEYS)
    base = load_config("mini")
    for key in paths.CONFIG_PATH_KEYS:  # no stale entry
        section, field = key.split(".")
        assert field in base[section], key
    assert "compile_cache_dir" not in paths.CONFIG_PATH_KEYS  # written by JAX, not read


def test_read_paths_names_the_config_file_its_keys_and_the_flags(tmp_path):
    lora, calibration = tmp_path / "style.safetensors", tmp_path / "magcache.json"
    lora.write_bytes(b"lora")
    calibration.write_text("{}")
    config = load_config(f"{DEFAULT_CONFIG}:mini,sample.cache_calibration={calibration}")
    config.sample.loras = (f"{lora}:0.5",)
    read = paths.read_paths(config, DEFAULT_CONFIG, {"--video": "in.mp4"})
    assert read == {"the config file": DEFAULT_CONFIG, "config sample.loras": [str(lora)],
                    "config sample.cache_calibration": [str(calibration)], "--video": "in.mp4"}
    assert "config sample.loras" not in paths.read_paths(config, skip=("sample.loras",))


@pytest.fixture()
def config_copy(tmp_path):
    """A copy of configs/facecam.py (its ``mini`` variant reads no shipped file)."""
    copy = tmp_path / "facecam.py"
    shutil.copy(DEFAULT_CONFIG, copy)
    return copy


@pytest.mark.parametrize("writer", ["sample", "aot", "calibrate_cache", "train_mini_vae"])
def test_writers_refuse_to_write_over_the_config_file(config_copy, writer):
    before, spec = config_copy.read_bytes(), f"{config_copy}:mini"
    args = {
        "sample": ("-m", "facecam_jax.sample", "--config", spec, "--out", str(config_copy)),
        "aot": ("-m", "facecam_jax.aot", "--config", spec, "--json", str(config_copy)),  # "path.py:variant"
        "calibrate_cache": ("tools/calibrate_cache.py", "--config", spec, "--out", str(config_copy)),
        "train_mini_vae": ("tools/train_mini_vae.py", "--config", spec, "--out", str(config_copy.parent)),
    }[writer]
    _one_error_line(_run(*args, timeout=120), "(the config file")
    assert config_copy.read_bytes() == before and os.listdir(config_copy.parent) == ["facecam.py"]


def test_encode_prompt_refuses_to_write_over_its_checkpoint(tmp_path):
    checkpoint = tmp_path / "umt5.safetensors"
    checkpoint.write_bytes(b"weights")
    result = _run("tools/encode_prompt.py", "--checkpoint", str(checkpoint), "--out", str(checkpoint), "a prompt")
    _one_error_line(result, "is an input (--checkpoint)")
    assert checkpoint.read_bytes() == b"weights"


def test_sample_refuses_to_write_over_its_cache_calibration(config_copy):
    calibration = config_copy.parent / "magcache.json"
    calibration.write_text('{"format": "facecam-magcache-ratios"}')
    result = _run("-m", "facecam_jax.sample", "--config", f"{config_copy}:mini",
                  f"--config.sample.cache_calibration={calibration}", "--out", str(calibration), timeout=120)
    _one_error_line(result, "--out", "is an input (config sample.cache_calibration)")
    assert calibration.read_text() == '{"format": "facecam-magcache-ratios"}'


@pytest.mark.parametrize("flag, fragment", [
    (("--height", "0"), "--height 0 is not a positive multiple of 16; use 16"),  # 0 is a value, not "unset"
    (("--height", "100000"), "--height 100000 is more than 4096 pixels"),  # not an OpenCV out-of-memory
    (("--frames", "5"), "--frames 5 is shorter than the model's window of 9 frames"),  # not 9 frames, silently
    (("--frames", "100000"), "--frames 100000 is more than sample.max_frames=481; the nearest valid value is 481"),
])
def test_sample_flags_pass_the_config_rules(tmp_path, flag, fragment):
    out = tmp_path / "o.mp4"
    result = _run("-m", "facecam_jax.sample", *flag, "--out", str(out), timeout=120)
    _one_error_line(result, fragment)
    assert not out.exists()


def test_a_config_file_with_a_syntax_error_is_its_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {\n")
    with pytest.raises(ConfigFileError, match=f"^{bad}:2: syntax error: "):
        load_config(f"{bad}:mini")
    result = _run("-m", "facecam_jax.train", "--workdir", str(tmp_path / "run"), "--config", f"{bad}:mini")
    _one_error_line(result, f"bad --config: {bad}:2: syntax error")
    assert not (tmp_path / "run").exists()


def test_a_garbage_calibration_and_a_binary_manifest_name_their_file(tmp_path):
    calibration, manifest = tmp_path / "magcache.json", tmp_path / "eval.csv"
    calibration.write_text("{ratios: nope")
    with pytest.raises(ValueError, match=f"{calibration} is not a MagCache calibration \\(not JSON"):
        load_calibration(str(calibration))
    manifest.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    with pytest.raises(ManifestError, match=f"manifest {manifest} is not text"):
        read_manifest(manifest)
