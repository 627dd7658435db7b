"""Output paths: refused before any work when they are directories, under a file, unwritable,
or one of the inputs (nothing a user owns is written over)."""

import importlib.util
import os

import pytest

from facecam_jax.camera import preview
from facecam_jax.errors import OutputPathError
from facecam_jax.runtime import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "in.mp4").write_bytes(b"source")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    return tmp_path


def test_good_outputs_pass(files):
    paths.check_outputs({"--out": files / "new" / "deeper" / "out.mp4", "--json": files / "out.json"},
                        {"--video": files / "in.mp4", "--checkpoint": files / "ckpt", "--missing": files / "nope"})
    paths.check_outputs(directories={"--out": files / "converted"}, inputs={"--checkpoint": files / "ckpt"})


@pytest.mark.parametrize("case, match", [
    ("directory", "is a directory, not a file"),
    ("under_file", "which is a file, not a folder"),
    ("input", r"is an input \(--video\)"),
    ("symlink", r"is an input \(--video\)"),
    ("hardlink", r"is an input \(--video\)"),
    ("twice", "are the same path"),
    ("inside_input_folder", "already exists inside an input folder"),
    ("empty", "is empty"),
])
def test_bad_file_outputs_are_one_line(files, case, match):
    out = {"directory": files, "under_file": files / "afile" / "out.mp4", "input": files / "in.mp4",
           "symlink": files / "link.mp4", "hardlink": files / "hard.mp4", "twice": files / "o.mp4",
           "inside_input_folder": files / "ckpt" / "model.safetensors", "empty": ""}[case]
    if case == "symlink":
        os.symlink(files / "in.mp4", out)
    if case == "hardlink":
        os.link(files / "in.mp4", out)
    outputs = {"--out": out, "--out_md": files / "o.mp4"} if case == "twice" else {"--out": out}
    with pytest.raises(OutputPathError, match=match) as error:
        paths.check_outputs(outputs, {"--video": files / "in.mp4", "--checkpoint": files / "ckpt"})
    assert "\n" not in str(error.value)
    assert (files / "in.mp4").read_bytes() == b"source"


def test_directory_outputs(files):
    with pytest.raises(OutputPathError, match="is a file; give a directory"):
        paths.check_outputs(directories={"--out": files / "afile"})
    with pytest.raises(OutputPathError, match="holds an input"):  # writing there could replace the input
        paths.check_outputs(directories={"--out": files}, inputs={"--checkpoint": files / "ckpt"})
    with pytest.raises(OutputPathError, match=r"is an input \(--checkpoint\)"):
        paths.check_outputs(directories={"--out": files / "ckpt"}, inputs={"--checkpoint": files / "ckpt"})


def test_unwritable_outputs(files, monkeypatch):
    # As root every folder is writable; the check asks os.access, so ask it to say no.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(files) else real(p, mode))
    with pytest.raises(OutputPathError, match="is not writable"):
        paths.check_outputs({"--out": files / "out.mp4"})


def test_config_inputs_are_its_existing_path_fields(files):
    from facecam_jax.runtime.config_file import load_config

    config = load_config(f"mini,vae.checkpoint='{files / 'ckpt'}'")
    config.model.dit_overlay = (str(files / "in.mp4"), str(files / "missing.safetensors"))
    found = paths.config_inputs(config)
    assert found == {"config vae.checkpoint": [str(files / "ckpt")], "config model.dit_overlay": [str(files / "in.mp4")]}


def test_preview_and_convert_refuse_before_any_work(files):
    with pytest.raises(OutputPathError, match="--save-trajectory"):
        preview.main(["--trajectory", str(files / "in.mp4"), "--save-trajectory", str(files / "in.mp4"),
                      "--out", str(files / "cond.mp4")])
    os.replace(files / "in.mp4", files / "c_overlay.mp4")
    with pytest.raises(OutputPathError, match="overlay video.*is an input"):  # <out>_overlay.mp4 is the video
        preview.main(["--video", str(files / "c_overlay.mp4"), "--out", str(files / "c.mp4")])
    with pytest.raises(ValueError, match="--frames 100000 must be in 1..1601"):
        preview.main(["--frames", "100000", "--out", str(files / "cond.mp4")])
    assert not (files / "cond.mp4").exists() and not (files / "c.mp4").exists()
    spec = importlib.util.spec_from_file_location("convert", os.path.join(ROOT, "tools", "convert_wan_checkpoint.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    with pytest.raises(OutputPathError, match="holds an input"):  # before the checkpoint is read
        convert.main(["--checkpoint", str(files / "ckpt" / "model.safetensors"), "--out", str(files)])
    with pytest.raises(OutputPathError, match="is a file"):
        convert.main(["--checkpoint", str(files / "ckpt"), "--out", str(files / "afile")])
