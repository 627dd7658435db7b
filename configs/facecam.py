"""FaceCam configuration: `get_config("variant,key=value,...")`.

    python -m facecam_jax.train --config configs/facecam.py               # mini, laptop-sized
    python -m facecam_jax.train --config configs/facecam.py:mini,frames=21
    python -m facecam_jax.train --config configs/facecam.py:nersemble --config.data.multiview_root=/data/nersemble
    python tools/train_mini_vae.py && python -m facecam_jax.train --config configs/facecam.py:learn --workdir runs/learn

Variants (`VARIANTS`: each is the base below plus its own overrides, decided in one place):
  mini       (default: the base itself) tiny random DiT and VAE (FaceCam's exact input layout
             at toy width) on the carphone mini multi-view dataset (built and cached on first
             use, facecam_jax/data/mini_dataset.py) plus carphone as in-the-wild video;
             17 frames at stride 3, 64x48, batch 2, 30 steps: runs on a laptop CPU.
  learn      the learning proof (bench/learn_mini.py, bench/RESULTS.md): the mini dataset at
             9 frames, stride 1, with time windows 4, 8 and -1 and camera 4 held out; the
             mini VAE trained for reconstruction (tools/train_mini_vae.py, data/learned_mini/vae)
             and the `small` DiT trained from scratch (every parameter), batch 4, 2400 steps
             (~65 min on a 2-core CPU); `python -m facecam_jax.sample` with no flags uses the
             shipped result (data/learned_mini).
  recammaster  ReCamMaster's camera (camera.kind=recammaster: extrinsics in every block) on
             Wan2.1-T2V-1.3B at 81 x 480 x 832, its trainable set; recammaster-mini the same
             kind at the mini scale (tiny DiT, mini dataset).
  cameractrl2  CameraCtrl II's camera (camera.kind=plucker: Plücker ray maps patchified and
             added to the tokens) on Wan2.1-T2V-1.3B, camera dropout and camera guidance;
             plucker-mini the same kind at the mini scale.
  factorportrait  FactorPortrait (camera.kind=factorportrait: reference image, face normal
             maps and ray maps fused on channels, expression codes modulating every block) on
             Wan2.1-T2V-1.3B, self-reenactment training on multi-view data; factorportrait-14b
             the same on Wan2.1-T2V-14B; factorportrait-mini the same kind at the mini scale,
             trained and shipped (data/factorportrait_mini): python -m facecam_jax.sample
             --config configs/facecam.py:factorportrait-mini --image ref.png --driving drive.mp4;
             factorportrait-mini-no-normals its C2 ablation (no normal maps).
  scale-landmarks, scale-recammaster, scale-plucker, scale-none
             FaceCam's claim tested: the same recipe with only camera.kind changed, on the
             scale-ambiguous mini dataset (one scene at scales 0.6-1.6), bench/camera_kinds.py.
  nersemble  the paper's recipe (SPEC 6, 7): Wan2.2-I2V-A14B experts, 81 frames at stride 3,
             704x480, NeRSemble v2 plus a folder of in-the-wild videos, AdamW 5e-5, batch 24,
             3K steps; set data.multiview_root, data.wild_root, model.dit_checkpoint,
             model.expert, vae.checkpoint and text.embeddings.

`key=value` overrides a field by its name when one section has it (`frames=21`, `steps=100`)
or by its dotted path (`data.mini.num_cameras=6`, `optimizer.lr=1e-4`). With absl flags,
`--config.train.steps=100` works as well. `make_train_iterator` reads only `config.data`.
"""

from __future__ import annotations

import ast
import difflib
import os

import ml_collections
from ml_collections import config_dict

# The `learn` variant's trained weights, shipped: the mini VAE (tools/train_mini_vae.py) in
# vae/ and the small DiT (python -m facecam_jax.train --config configs/facecam.py:learn) as
# facecam.safetensors.
LEARNED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "learned_mini")
LEARNED_VAE = os.path.join(LEARNED_DIR, "vae")
# The comparison of camera representations (the scale-* variants): its trained models, shipped
# (data/scale_kinds/<kind>), the scene scales of its training data, and its step budget.
SCALE_DIR = os.path.join(os.path.dirname(LEARNED_DIR), "scale_kinds")
SCALE_FACTORS = (0.6, 0.8, 1.25, 1.6)
SCALE_STEPS = 1200
# FactorPortrait at the mini scale (factorportrait-mini): its trained models, shipped (the full
# model, and no_normals/: the C2 ablation), and their step budget.
FACTORPORTRAIT_DIR = os.path.join(os.path.dirname(LEARNED_DIR), "factorportrait_mini")
FACTORPORTRAIT_STEPS = 2400


def data_config() -> ml_collections.ConfigDict:
    """The `data` section: everything facecam_jax.data.pipeline needs."""
    data = ml_collections.ConfigDict()
    data.dataset = "mini"  # "mini": roots come from the mini-dataset build; "files": the roots below
    # "nersemble", "processed" (rgb_images/ + masks/ per sequence) or "multicamvideo" (ReCamMaster's
    # MultiCamVideo: videos/camNN.mp4 + cameras/camera_extrinsics.json per scene, moving cameras)
    data.multiview_layout = "nersemble"
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
    # Held-out evaluation data (facecam_jax.data.pipeline.heldout_source): indices into each
    # sequence's non-overlapping windows (negative from the end), and camera positions (serial
    # order). Training never sees a frame of a held-out window, nor a held-out camera.
    data.holdout_windows = ()
    data.holdout_cameras = ()
    # Multi-view targets only from these cameras (positions in serial order; sources from the
    # others); (): any camera. For fine-tuning on one camera's training windows (bench/learn_lora.py).
    data.target_cameras = ()

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
    # The scale-ambiguous build (facecam_jax/data/mini_dataset.py): one participant per scale,
    # the whole scene (head, rig) scaled by it: the same pixels, metric cameras times the scale
    # (the subject at scale x 1 m); (): the plain build, every camera at 1 m.
    data.mini.scales = ()
    return data


def model_config() -> tuple[ml_collections.ConfigDict, ...]:
    """The `model`, `vae` and `text` sections (what facecam_jax.build builds)."""
    model = ml_collections.ConfigDict()
    model.dit = "tiny"  # a preset of facecam_jax.models.wan_dit.PRESETS
    model.dit_checkpoint = ""  # "": random init (mini); else a path load_dit reads
    model.dit_overlay = ()  # partial state dicts applied over the checkpoint (FaceCam experts)
    model.in_dim = 36  # FaceCam layout [noisy 16, camera 16, zeros 4]; wider than the base: zero-init
    model.param_dtype = "float32"
    model.compute_dtype = "float32"
    model.attention = "xla"  # xla | cudnn | chunked | auto (facecam_jax/models/attention.py)
    model.remat = "none"  # none | full | dots | dots_no_batch
    model.expert = ""  # Wan2.2 A14B: "high" or "low" restricts training to its timestep range
    model.expert_boundary = 0.9  # FaceCam's boundary (t >= 900: high-noise expert)
    # The flow-matching time shift (SPEC 7): training draws levels on this shifted grid and
    # sampling integrates on it.
    model.shift = 5.0
    # Weight-only quantization of the blocks' linear layers for sampling (facecam_jax.models.quant):
    # none | int8 | fp8 (e4m3), per output channel, applied as the weights load.
    model.quantize = "none"

    vae = ml_collections.ConfigDict()
    vae.config = "mini"  # mini | wan2.1 | wan2.2 (ignored when a checkpoint is given)
    vae.checkpoint = ""  # Wan2.1_VAE.pth or a diffusers vae/ folder
    vae.dtype = "float32"

    text = ml_collections.ConfigDict()
    # A prompt-embedding file written by tools/encode_prompt.py. "": a constant all-zero context
    # stands in for FaceCam's single fixed prompt (the mini config has no text encoder).
    text.embeddings = ""
    text.prompt = "A portrait of a person"  # the prompt FaceCam trains and samples with
    return model, vae, text


def train_config() -> tuple[ml_collections.ConfigDict, ...]:
    """The `train`, `optimizer` and `mesh` sections."""
    train = ml_collections.ConfigDict()
    train.steps = 30
    train.log_every = 1
    train.checkpoint_every = 10
    train.preview_every = 100  # steps between TensorBoard images of a batch (source | target | camera)
    train.keep_checkpoints = 3
    # Parameters that are trained (the rest is frozen): names matched against parameter paths;
    # the paper trains the self-attention (q, k, v, o, norm_q, norm_k) and the patch embedding.
    train.trainable = ("self_attn", "patch_embedding")
    # LoRA (facecam_jax.build.trainable_filter): lora_rank > 0 trains rank-r adapters on every
    # Linear inside the modules `trainable` selects, and the selected non-Linear parameters (the
    # patch embedding, the q/k RMSNorm scales) in full; the base stays frozen. The run exports
    # facecam[_<expert>]_lora.safetensors (diffusers/PEFT naming) beside the partial state dict
    # of the fully trained parameters. 0: full fine-tuning of `trainable`. lora_alpha 0: = rank.
    train.lora_rank = 0
    train.lora_alpha = 0.0
    # CameraCtrl II's joint training: the probability that a sample's camera is the null camera
    # (camera kinds with one, e.g. plucker: an all-zero ray map), which sample.camera_guidance
    # guides against. In-the-wild videos, which have no cameras, always have the null camera.
    train.camera_dropout = 0.0
    # CameraCtrl II's clip-level extension, trained jointly with single clips: the probability
    # that a sample's first 1 .. F // 2 latent frames (drawn uniformly) are clean context (not
    # noised, marked by a mask channel, no loss on them), as when sample.extend=clip continues
    # a clip. Camera kinds with a context mask (plucker) only.
    train.context_prob = 0.0
    # Chip utilisation: every step logs tflops_per_device and, against the device's dense bf16
    # peak (facecam_jax.perf.chips), mfu; peak_tflops > 0 overrides the peak (TFLOP/s per device).
    train.peak_tflops = 0.0
    # A jax.profiler trace of profile_steps steps from profile_start_step (1-based) into
    # <workdir>/profile (xprof --logdir <workdir>/profile); 0 steps: no trace.
    train.profile_start_step = 2
    train.profile_steps = 0

    optimizer = ml_collections.ConfigDict()
    optimizer.lr = 1e-4
    optimizer.b1 = 0.9
    optimizer.b2 = 0.999
    optimizer.eps = 1e-8
    optimizer.weight_decay = 0.01
    optimizer.grad_clip = 1.0  # global-norm clip; 0 disables

    mesh = ml_collections.ConfigDict()  # (data, fsdp, context, tensor); one may be -1 (the rest)
    mesh.data = 1
    mesh.fsdp = -1
    mesh.context = 1
    mesh.tensor = 1
    return train, optimizer, mesh


def sample_config() -> ml_collections.ConfigDict:
    """The `sample` section (facecam_jax.sampling.sampler; the model sections are shared with training)."""
    sample = ml_collections.ConfigDict()
    sample.num_steps = 8  # Euler steps (the paper: 50)
    sample.cfg_scale = 5.0  # text guidance; skipped without text.embeddings (no negative prompt)
    # Camera guidance (CameraCtrl II eq. 3, camera kinds with a null camera): one more pass per
    # step against the null camera; 1.0: off (no extra pass).
    sample.camera_guidance = 1.0
    sample.negative_prompt = ""
    sample.framing = "official"  # official | source (camera.trajectories)
    # Wan2.2 A14B: both experts (and their FaceCam overlays); empty: model.dit_checkpoint alone.
    sample.high_noise_checkpoint = ""
    sample.high_noise_overlay = ()
    sample.low_noise_checkpoint = ""
    sample.low_noise_overlay = ()
    # A folder of trained weights (facecam*.safetensors) to overlay when no --workdir is given;
    # its *_lora.safetensors files are merged at strength 1.
    sample.weights = ""
    # LoRA files merged into every expert after the weights above: "path" (strength 1) or
    # "path:strength"; the sample CLI's --lora PATH[:STRENGTH] appends here.
    sample.loras = ()
    # The ODE solver on the shifted sigma grid (facecam_jax.diffusion.flow): euler (the paper's) | unipc | dpmpp_2m.
    sample.solver = "euler"
    # Step caching (facecam_jax.diffusion.step_cache): none | magcache, with its rule's knobs and the ratio
    # curve tools/calibrate_cache.py writes for the model.
    sample.cache = "none"
    sample.cache_calibration = ""
    sample.cache_threshold = 0.12
    sample.cache_max_skips = 2
    sample.cache_retention = 0.2
    # Where the DiT weights wait while sampling: none (on the device) | experts (the A14B expert
    # not running is in host memory, swapped at the boundary) | blocks (each layer streamed in).
    sample.offload = "none"
    # Classifier-free guidance's two passes: batch (one forward of both; on a mesh with
    # mesh.data=2, one branch per device group) | sequential (one after the other: half the
    # activation memory, e.g. A14B on one v5e chip).
    sample.cfg = "batch"
    # Videos longer than the model's window (data.frames) are re-rendered in windows that
    # overlap by window_overlap latent frames, denoised jointly; window_batch windows per
    # forward pass (0: all at once); at most max_frames frames.
    sample.window_overlap = 2
    sample.window_batch = 0
    # Or (extend=clip, CameraCtrl II) clip by clip: each clip after the first starts with the
    # last context_frames latent frames (4 (n - 1) + 1 video frames) of the clip before, decoded
    # and encoded again, as clean context; the rest of it is new. Camera kinds with a context
    # mask (plucker) only; their model learns it with train.context_prob.
    sample.extend = "joint"
    sample.context_frames = 2
    sample.max_frames = 481
    return sample


def distributed_config() -> ml_collections.ConfigDict:
    """The `distributed` section: how the processes of a multi-process run find each other."""
    d = ml_collections.ConfigDict()
    d.auto = False  # jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI)
    # Or explicitly, for clusters without auto-detection and for localhost runs:
    d.coordinator_address = ""  # host:port of process 0; "" : a single process
    d.num_processes = 1
    d.process_id = 0
    d.initialization_timeout = 300  # seconds to wait for every process to join
    return d


def camera_config() -> ml_collections.ConfigDict:
    """The `camera` section: which camera representation conditions the DiT."""
    camera = ml_collections.ConfigDict()
    # A module of facecam_jax/conditioning/ (facecam_jax.options.camera_kinds()): landmarks is
    # FaceCam's rasterized MediaPipe landmark maps.
    camera.kind = "landmarks"
    # FactorPortrait only: False is the paper's C2 ablation, no head-pose normal maps (their
    # channels of the DiT input stay zero and the data pipeline does not render them).
    camera.normal_maps = True
    return camera


def base_config() -> ml_collections.ConfigDict:
    """Every section at its default: the `mini` variant."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.variant = "mini"
    # JAX's persistent compilation cache: a program compiled once loads in seconds the next
    # time. None: $FACECAM_CACHE/xla (~/.cache/facecam_jax/xla); "" turns it off.
    config.compile_cache_dir = config_dict.placeholder(str)
    config.distributed = distributed_config()
    config.data = data_config()
    config.model, config.vae, config.text = model_config()
    config.train, config.optimizer, config.mesh = train_config()
    config.sample = sample_config()
    config.camera = camera_config()
    # Logical axis -> mesh axes (facecam_jax.sharding); None: the defaults there.
    config.sharding_rules = config_dict.placeholder(tuple)
    return config


# The camera-representation baselines' shared recipe: Wan2.1-T2V-1.3B (16 input channels: target
# and source along frames) at ReCamMaster's shape, bf16, splash attention, full remat.
_T2V_1_3B_480P: dict[str, object] = {
    "data.frames": 81,
    "data.height": 480,
    "data.width": 832,
    "model.dit": "wan2.1-t2v-1.3b",
    "model.in_dim": 16,
    "model.param_dtype": "bfloat16",
    "model.compute_dtype": "bfloat16",
    "model.attention": "auto",
    "model.remat": "full",
    "vae.config": "wan2.1",
    "vae.dtype": "bfloat16",
}

# FactorPortrait at its paper's shape (factorportrait, factorportrait-14b): every parameter
# trained, multi-view pairs only, one target camera per clip.
_FACTORPORTRAIT: dict[str, object] = {
    **_T2V_1_3B_480P,
    "camera.kind": "factorportrait",
    "model.in_dim": 54,
    "data.wild_ratio": 0.0,
    "data.max_shots": 1,
    "train.trainable": ("all",),
    "optimizer.lr": 1e-5,
    "sample.num_steps": 50,
}

# FactorPortrait's mini recipe (factorportrait-mini and its ablation): the learn recipe's data
# split and optimiser, multi-view pairs only, one target camera per clip.
_FACTORPORTRAIT_MINI: dict[str, object] = {
    "camera.kind": "factorportrait",
    "model.in_dim": 54,
    "model.dit": "small",
    "model.shift": 3.0,
    "vae.checkpoint": LEARNED_VAE,
    "data.frames": 9,
    "data.stride": 1,
    "data.window_step": 4,
    "data.holdout_windows": (4, 8, -1),
    "data.holdout_cameras": (4,),
    "data.batch_size": 4,
    "data.wild_ratio": 0.0,
    "data.max_shots": 1,
    "data.multiview_source_scale": (1.0, 1.0),
    "data.multiview_target_zoom": (1.0, 1.0),
    "train.steps": FACTORPORTRAIT_STEPS,
    "train.log_every": 25,
    "train.checkpoint_every": 200,
    "train.preview_every": 400,
    "train.trainable": ("all",),
    "optimizer.lr": 3e-4,
    "sample.num_steps": 20,
}

# Each variant is the base plus these overrides (dotted paths), and nothing else.
VARIANTS: dict[str, dict[str, object]] = {
    "mini": {},
    "learn": {
        "data.frames": 9,  # half the VAE encoding per step of 17 frames: twice the steps in the hour
        "data.stride": 1,  # 120 frames: 13 non-overlapping windows of 9
        "data.window_step": 4,
        "data.holdout_windows": (4, 8, -1),  # frames 36-44, 72-80 and 108-116
        "data.holdout_cameras": (4,),  # (yaw 12, pitch -9): between cameras 0, 2, 6 and 7
        "data.batch_size": 4,
        "model.dit": "small",
        "model.shift": 3.0,  # latents of 3 x 8 x 6: less shift than FaceCam's 5 (its latents are 21 x 88 x 60)
        "vae.checkpoint": LEARNED_VAE,
        # From scratch: every parameter, a higher constant lr. 2400 steps: at 1200 the outputs
        # barely follow the camera map (bench/RESULTS.md).
        "train.steps": 2400,
        "train.log_every": 25,
        "train.checkpoint_every": 200,
        "train.preview_every": 200,
        "train.trainable": ("all",),
        "optimizer.lr": 3e-4,
        "sample.weights": LEARNED_DIR,  # shipped: python -m facecam_jax.sample re-renders with it
        "sample.num_steps": 20,
        "sample.framing": "source",  # the proxy head starts where the source face is, as in its training maps
        "sample.cache_calibration": os.path.join(LEARNED_DIR, "magcache.json"),  # tools/calibrate_cache.py
    },
    # ReCamMaster (camera extrinsics in every block) on Wan2.1-T2V-1.3B at its paper's shape:
    # target and source along frames (16 channels), the paper's trainable set (its camera
    # layers, added by the camera kind, and the self-attention), multi-view pairs only (an
    # in-the-wild video has no cameras). Set model.dit_checkpoint (Wan2.1-T2V-1.3B to fine-tune
    # from the base, or ReCamMaster's step20000.ckpt: its camera layers load with it) and the
    # data roots.
    "recammaster": {
        **_T2V_1_3B_480P,
        "camera.kind": "recammaster",
        "data.wild_ratio": 0.0,
        "train.trainable": ("self_attn",),
        "optimizer.lr": 1e-4,
        "sample.num_steps": 50,
    },
    # The same kind at the mini scale of the default config (tiny DiT, mini dataset): tests and
    # the comparison of camera representations.
    "recammaster-mini": {
        "camera.kind": "recammaster",
        "data.wild_ratio": 0.0,
        "model.in_dim": 16,
        "train.trainable": ("self_attn",),
    },
    # CameraCtrl II (camera.kind=plucker: Plücker ray maps through their own patchify) on
    # Wan2.1-T2V-1.3B: the paper's trainable set (the whole DiT and the camera patchify), joint
    # training (camera dropout; in-the-wild videos have no camera), its sampler settings (Euler,
    # 32 steps, shift 12, text CFG 7.5, camera CFG 8.0), at ReCamMaster's shape for comparison.
    # Clip extension is trained jointly (the paper's second stage; its share of samples is not
    # published: a quarter here) and, with sample.extend=clip, continues from 5 latent frames
    # (17 video frames; the paper's context is 5 frames up to half the clip).
    "cameractrl2": {
        **_T2V_1_3B_480P,
        "camera.kind": "plucker",
        "model.shift": 12.0,
        "train.trainable": ("all",),
        "train.camera_dropout": 0.1,
        "train.context_prob": 0.25,
        "optimizer.lr": 1e-5,
        "sample.num_steps": 32,
        "sample.cfg_scale": 7.5,
        "sample.camera_guidance": 8.0,
        "sample.context_frames": 5,
    },
    # The same kind at the mini scale (tiny DiT, mini dataset with its in-the-wild clip).
    "plucker-mini": {
        "camera.kind": "plucker",
        "model.in_dim": 16,
        "train.trainable": ("self_attn",),
        "train.camera_dropout": 0.1,
        "train.context_prob": 0.25,
    },
    # FactorPortrait (camera.kind=factorportrait, issue 33): one portrait image animated by a
    # driving video's expressions (the expression controller) and head pose (face normal maps)
    # along a camera path (Plücker ray maps), all fused on channels (in_dim 54: video, reference,
    # normals, rays). Wan2.1-T2V-1.3B fully fine-tuned as the paper, self-reenactment on
    # multi-view pairs (one target camera per clip; in-the-wild clips have no per-frame meshes).
    "factorportrait": _FACTORPORTRAIT,
    # The same at Wan2.1-T2V-14B (the paper's base family, its larger size), sized for TPU slices
    # with python -m facecam_jax.aot (bench/tpu_fit.py, the fp-14b rows of bench/RESULTS.md).
    "factorportrait-14b": {**_FACTORPORTRAIT, "model.dit": "wan2.1-t2v-14b"},
    # The same kind at the mini scale, trained and shipped (data/factorportrait_mini, as `learn` is
    # for FaceCam; bench/factorportrait.py, bench/RESULTS.md): the small DiT from scratch on the
    # mini dataset's multi-view pairs (camera 4 and time windows 4, 8 and the last held out), the
    # shipped mini VAE, 9 frames. No source scaling or target zoom: the reference is the source
    # camera's first frame as it is, and a zoom would change the image without the target camera.
    # `python -m facecam_jax.sample --config configs/facecam.py:factorportrait-mini --image ref.png
    # --driving drive.mp4 --out out.mp4` animates with it.
    "factorportrait-mini": {**_FACTORPORTRAIT_MINI, "sample.weights": FACTORPORTRAIT_DIR},
    # The paper's C2 ablation at the same budget: no head-pose normal maps.
    "factorportrait-mini-no-normals": {**_FACTORPORTRAIT_MINI, "camera.normal_maps": False,
                                       "sample.weights": os.path.join(FACTORPORTRAIT_DIR, "no_normals")},
    # FaceCam's claim tested (bench/camera_kinds.py, bench/RESULTS.md): one recipe, only the
    # camera representation changes (scale-landmarks, scale-recammaster, scale-plucker and the
    # floor scale-none). The scale-ambiguous mini dataset: four participants, the same videos
    # with the scene scaled by 0.6, 0.8, 1.25 and 1.6 (data.mini.scales: heads that much larger,
    # cameras that much farther, so only the metric cameras differ); one target camera per clip and
    # no zoom, pan or source scaling (the augmentations would add image changes no extrinsics
    # state); multi-view pairs only (every sample has true metric cameras). The learn recipe
    # otherwise: the small DiT from scratch (same seed), the shipped mini VAE, batch 4.
    **{f"scale-{kind}": {
        "data.mini.scales": SCALE_FACTORS,
        "data.frames": 9,
        "data.stride": 1,
        "data.window_step": 4,
        "data.holdout_windows": (4, 8, -1),
        "data.holdout_cameras": (4,),
        "data.batch_size": 4,
        "data.max_shots": 1,
        "data.multiview_source_scale": (1.0, 1.0),
        "data.multiview_target_zoom": (1.0, 1.0),
        "data.wild_ratio": 0.0,
        "camera.kind": kind,
        "model.dit": "small",
        "model.in_dim": 36 if kind == "landmarks" else 16,
        "model.shift": 3.0,
        "vae.checkpoint": LEARNED_VAE,
        "train.steps": SCALE_STEPS,
        "train.log_every": 25,
        "train.checkpoint_every": 200,
        "train.preview_every": 400,
        "train.trainable": ("all",),
        "optimizer.lr": 3e-4,
        "sample.weights": os.path.join(SCALE_DIR, kind),
        "sample.num_steps": 20,
        "sample.framing": "source",
    } for kind in ("landmarks", "recammaster", "plucker", "none")},
    "nersemble": {
        "data.dataset": "files",
        "data.frames": 81,
        "data.height": 704,
        "data.width": 480,
        "data.batch_size": 24,
        "data.workers": 8,
        "model.dit": "wan2.2-i2v-a14b",
        "model.param_dtype": "bfloat16",
        "model.compute_dtype": "bfloat16",
        "model.attention": "auto",
        "model.remat": "full",
        "vae.config": "wan2.1",
        "vae.dtype": "bfloat16",
        "train.steps": 3000,
        "train.log_every": 10,
        "train.checkpoint_every": 250,
        "optimizer.lr": 5e-5,
        # The mesh stays the base's (fsdp over every chip, no context parallelism), sized with
        # `python -m facecam_jax.aot` (bench/RESULTS.md, "TPU fit"): one A14B expert at
        # 81 x 704 x 480, batch 1 per chip, full remat, splash attention fits chips with ~96 GB
        # (v5p: 88 of 96 GiB on a 4-chip slice, less on larger ones; H200). Smaller chips split
        # each sample's sequence over a context group, batch 1 per group (data.batch_size =
        # chips / context): v6e (32 GiB) mesh.context=4 (29 of 31 GiB on v6e:2x4, the smallest
        # v6e slice); v5e (16 GiB) mesh.context=8 (15.0 of 15.75 GiB on v5e:4x4, the smallest
        # v5e slice). The smallest v5p slice is 2 chips with mesh.context=2.
        "sample.num_steps": 50,
        "sample.window_overlap": 5,  # of 21 latent frames: windows every 64 video frames
    },
}

_SECTIONS = ("data", "model", "vae", "text", "train", "optimizer", "mesh", "sample", "camera", "distributed")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. a path


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets ``key`` (a dotted path, or a field name that exactly one section has) to ``value``."""
    path = key.split(".")
    if len(path) == 1 and key not in config:
        owners = [name for name in _SECTIONS if name in config and key in config[name]]
        if len(owners) > 1:
            raise KeyError(f"config override {key!r} is ambiguous ({owners}); use a dotted path")
        path = [*owners, key]
    node = config
    for name in path[:-1]:
        if name not in node:
            raise KeyError(f"config override {key!r}: no section {name!r}")
        node = node[name]
    if path[-1] not in node:
        names = list(node.keys())
        if node is config:  # a bare field name: any section's fields, by their dotted paths
            names += [f"{s}.{f}" for s in _SECTIONS if s in config for f in config[s]]
        by_field = {n.rsplit(".", 1)[-1]: n for n in reversed(names)}
        close = [by_field[m] for m in difflib.get_close_matches(path[-1], list(by_field), n=1)]
        raise KeyError(f"config override {key!r}: no field {path[-1]!r} in "
                       f"{'config' if node is config else '.'.join(path[:-1])}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
    if isinstance(node[path[-1]], tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[path[-1]] = value
    except TypeError as e:  # ml_collections keeps each field's type: "steps=many", "lr=fast"
        raise ValueError(f"config override {key}={value!r}: {str(e).splitlines()[0]}") from None


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of `arg` = "variant[,key=value...]" (an empty variant means "mini")."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    variant = "mini"
    if parts and "=" not in parts[0]:
        variant = parts.pop(0)
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; use one of {', '.join(map(repr, VARIANTS))}")
    config = base_config()
    config.variant = variant
    for key, value in VARIANTS[variant].items():
        set_field(config, key, value)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"config override {part!r} is not key=value (in {arg!r})")
        key, text = (s.strip() for s in part.split("=", 1))
        set_field(config, key, _parse_value(text))
    return config
