"""Evaluation of re-rendered portrait videos (paper 4.3, SPEC 9): camera correctness, PSNR/SSIM, identity.

One row per (output, source, motion[, target]) of a manifest (`manifest.read_manifest`):

- Camera correctness (binary): MediaPipe landmarks on the first and last frames of the source
  (preprocessed to the output's size and length as the sampler does, so both share one
  framing and one clock) and of the output; head pose by PnP against the proxy head
  (`camera.pose`); the observed change is compared with the intended motion. Two references:
    "change" (default): the output's first->last change minus the source's first->last change
      (face shifts subtract, sizes divide, head angles subtract). This removes the subject's
      own motion and any fixed offset between the source framing and the output's first
      frame (the official proxy framing puts the face elsewhere than the nose-centred source
      crop, which would otherwise read as a pan or a zoom for every video).
    "last": the paper's literal protocol: last frame of the source against the last frame of
      the output (`pose.camera_correctness`).
  Both labels are always computed and stored; the reference picks the one the accuracy uses.
- PSNR and SSIM against the true target video when the manifest gives one: per-frame on uint8
  RGB with data range 255, averaged over frames. SSIM is Wang et al.'s Gaussian-window SSIM
  (sigma 1.5, 11 taps, K1 0.01, K2 0.03), implemented in `scores` so scikit-image stays a test extra.
- Identity: cosine similarity of dlib's face-recognition ResNet embeddings (the
  `face_recognition_models` package; ArcFace weights are not installable here) between the
  source and the output faces. Optional: without dlib the column says how to install it.

Per-video failures (a missing or unreadable file, no face, too few frames, an unknown motion)
become the row's `error` text; the evaluation itself never stops for them.

Modules: `manifest` (rows -> entries), `scores` (PSNR, SSIM), `camera_correctness`, `identity`
(dlib, optional), `report` (Row, Report, `evaluate_rows` of the manifest's entries: what the CLI
facecam_jax.evaluate runs, after checking its output paths; `evaluate_manifest` does both).
"""
