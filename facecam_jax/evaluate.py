"""Evaluates re-rendered portrait videos: camera correctness, PSNR/SSIM, identity (paper 4.3, SPEC 9).

    python -m facecam_jax.evaluate --manifest runs/eval/manifest.json
    python -m facecam_jax.evaluate --manifest eval.csv --out_json eval.json --out_md eval.md --reference last

The manifest is a JSON list of objects or a CSV with a header, one row per video:
``output`` (the generated video), ``source`` (its input video), ``motion`` (a canonical motion
such as arc_left, or a trajectory JSON file; optional) and ``target`` (the true target video,
optional: PSNR/SSIM). Relative paths resolve against the manifest's folder. Writes a JSON
report and a markdown table (default: beside the manifest) and prints the table. Per-video
failures are rows with an error; a bad manifest is one ``error:`` line and exit code 1. The logic lives in
``facecam_jax.evaluation``.
"""

import os

from absl import flags

from facecam_jax.evaluation.camera_correctness import REFERENCES
from facecam_jax.evaluation.identity import IDENTITY_FRAMES
from facecam_jax.evaluation.manifest import ManifestError, read_manifest
from facecam_jax.evaluation.report import default_outputs, evaluate_rows
from facecam_jax.runtime import cli, paths

_MANIFEST = flags.DEFINE_string("manifest", None, "JSON list or CSV of output, source, motion[, target] rows")
_OUT_JSON = flags.DEFINE_string("out_json", None, "report JSON (default: <manifest>_eval.json)")
_OUT_MD = flags.DEFINE_string("out_md", None, "markdown table (default: <manifest>_eval.md)")
_REFERENCE = flags.DEFINE_enum("reference", "change", REFERENCES,
                               "camera correctness from the first->last change of output vs source, or the "
                               "paper's last-frame comparison")
_IDENTITY = flags.DEFINE_bool("identity", True, "compute identity similarity (needs the eval extra)")
_IDENTITY_FRAMES = flags.DEFINE_integer("identity_frames", IDENTITY_FRAMES,
                                        "evenly spaced frames per video for the identity score")
flags.mark_flag_as_required("manifest")


def main(argv):
    cli.start(argv)
    manifest = _MANIFEST.value
    try:
        entries = read_manifest(manifest)
    except ManifestError as e:
        raise ManifestError(f"bad manifest: {e}") from e
    default_json, default_md = default_outputs(manifest)
    out_json, out_md = _OUT_JSON.value or default_json, _OUT_MD.value or default_md
    # Before anything is scored: the report goes over no input and can be written.
    videos = [p for e in entries for p in (e.output, e.source, e.target, e.motion) if p]
    paths.check_outputs({"--out_json": out_json, "--out_md": out_md},
                        {"--manifest": manifest, "a video of the manifest": videos})
    report = evaluate_rows(entries, base=os.path.dirname(os.path.abspath(manifest)), reference=_REFERENCE.value,
                           identity=_IDENTITY.value, identity_frames=_IDENTITY_FRAMES.value)
    report.write(out_json, out_md)
    print(report.to_markdown())
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    cli.run(main)
