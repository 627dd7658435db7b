"""FaceCam training data (SPEC 6): Grain sources, augmentation and stitching, the pipeline.

Modules: `video` (decode only the frames a sample needs), `store` (prepared landmarks and
masks in zarr), `sources` (NeRSemble v2, processed and in-the-wild layouts as Grain
random-access sources), `prepare` (MediaPipe landmarks and selfie-segmentation masks, run
by tools/prepare_dataset.py), `augment` (the pure crop, zoom/pan and compositing geometry),
`transforms` (the paper's Algorithms 1-3 as Grain transforms), `pipeline`
(`make_train_iterator`), `mini_dataset` (a real multi-view set rendered from carphone).
Import the submodules directly.
"""
