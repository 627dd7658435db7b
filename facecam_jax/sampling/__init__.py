"""Sampling: the jitted sampling program (``program``) and its inputs (``inputs``), the experts
it runs (``experts``: loading, LoRA, offload), the batched render core (``render``), clip-level
extension (``extend``) and the sample command line's planning (``plan``). The names a user of the library needs are here::

    from facecam_jax import sampling
    result = sampling.generate(config, frames, trajectory)          # one video
    videos = sampling.render(config, experts, vae, sources, conditions, seeds, mesh=mesh)
"""

from facecam_jax.sampling.experts import Experts, load_experts, on_mesh, place_experts
from facecam_jax.sampling.extend import sample_clips
from facecam_jax.sampling.inputs import SampleInputs, abstract_inputs, make_inputs, noise_for
from facecam_jax.sampling.program import SampleOptions, make_sample_fn, options_for, sample_program, window_layout
from facecam_jax.sampling.render import (
    Result,
    contexts,
    default_source_video,
    generate,
    render,
    residual_norms,
    side_by_side,
)

__all__ = [
    "Experts", "Result", "SampleInputs", "SampleOptions", "abstract_inputs", "contexts", "default_source_video",
    "generate", "load_experts", "make_inputs", "make_sample_fn", "noise_for", "on_mesh", "options_for", "place_experts",
    "render", "residual_norms", "sample_clips", "sample_program", "side_by_side", "window_layout",
]
