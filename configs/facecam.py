"""FaceCam configuration: `get_config("variant,key=value,...")`.

    python -m facecam_jax.train --config configs/facecam.py               # mini, laptop-sized
    python -m facecam_jax.train --config configs/facecam.py:mini,frames=21
    python -m facecam_jax.train --config configs/facecam.py:nersemble --config.data.multiview_root=/data/nersemble

Variants:
  mini       (default) the carphone mini multi-view dataset (built and cached on first use,
             facecam_jax/data/mini_dataset.py) plus carphone as in-the-wild video;
             17 frames at stride 3, 64x48, batch 2, no worker processes.
  nersemble  the paper's recipe (SPEC 6): 81 frames at stride 3, 704x480, NeRSemble v2 plus a
             folder of in-the-wild videos; set data.multiview_root and data.wild_root.

`key=value` overrides a field of `config.data` by its name (`frames=21`) or any field by its
dotted path (`data.mini.num_cameras=6`). `make_train_iterator` reads only `config.data`.
"""

from __future__ import annotations

import ast

import ml_collections
from ml_collections import config_dict


def data_config(variant: str = "mini") -> ml_collections.ConfigDict:
    """The `data` section: everything facecam_jax.data.pipeline needs."""
    data = ml_collections.ConfigDict()
    data.dataset = "mini"  # "mini": roots come from the mini-dataset build; "files": the roots below
    data.multiview_layout = "nersemble"  # or "processed" (rgb_images/ + masks/ per sequence)
    data.multiview_root = ""  # "" : no multi-view data
    data.wild_root = ""  # folder of in-the-wild videos; "" : none
    data.prepared_root = ""  # where prepared landmarks/masks live; "" : beside the data
    data.detect_missing = False  # run MediaPipe in the workers for annotations not prepared

    # Sample shape: T = 1 + 4k frames (the Wan VAE's temporal stride), H and W multiples of 16.
    data.frames = 17
    data.height = 64
    data.width = 48
    data.stride = 3  # multi-view temporal stride (NeRSemble is captured at ~73 fps)
    data.window_step = 0  # frames between multi-view sample windows; 0: windows do not overlap
    data.wild_stride = 1  # in-the-wild samples are the first `frames` frames

    # Augmentation (SPEC 6; paper Algorithms 1-3).
    data.max_shots = 4  # K ~ U{1..max_shots} target cameras per multi-view sample
    data.composite = True  # replace the multi-view background by one random colour
    data.multiview_source_scale = (0.75, 1.25)
    data.multiview_target_zoom = (1.0, 1.25)
    data.wild_source_scale = (1.0, 1.5)
    data.wild_target_zoom = (1.0, 1.5)
    # Fraction of in-the-wild samples; None: proportional to the two datasets' sizes.
    data.wild_ratio = config_dict.placeholder(float)

    # Loading.
    data.seed = 0
    data.shuffle = True
    data.batch_size = 2  # global; each process loads batch_size // process_count
    data.workers = 0  # Grain worker processes (0: load in the training process)
    data.worker_buffer_size = 1  # batches each worker keeps ready
    data.read_threads = 1  # threads per process applying the transforms
    data.prefetch = 2  # samples read ahead per process (each holds three videos)

    # The mini dataset build (data.dataset == "mini").
    data.mini = ml_collections.ConfigDict()
    data.mini.height = 192
    data.mini.width = 128
    data.mini.num_cameras = 8

    if variant == "mini":
        pass
    elif variant == "nersemble":
        data.dataset = "files"
        data.frames = 81
        data.height = 704
        data.width = 480
        data.batch_size = 24
        data.workers = 8
        data.prefetch = 2
    else:
        raise ValueError(f"unknown config variant {variant!r}; use 'mini' or 'nersemble'")
    return data


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. a path


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of `arg` = "variant[,key=value...]" (an empty variant means "mini")."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    variant = "mini"
    if parts and "=" not in parts[0]:
        variant = parts.pop(0)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data_config(variant)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"config override {part!r} is not key=value (in {arg!r})")
        key, text = (s.strip() for s in part.split("=", 1))
        path = key.split(".")
        if len(path) == 1 and key in config.data:
            path = ["data", key]
        node = config
        for name in path[:-1]:
            if name not in node:
                raise KeyError(f"config override {key!r}: no section {name!r}")
            node = node[name]
        if path[-1] not in node:
            raise KeyError(f"config override {key!r}: no field {path[-1]!r} in "
                           f"{'config' if node is config else '.'.join(path[:-1])}")
        value = _parse_value(text)
        if isinstance(node[path[-1]], tuple) and isinstance(value, list):
            value = tuple(value)
        node[path[-1]] = value
    return config
