"""Solvers and the MagCache step cache on the shipped mini model: quality against steps, and speed.

    python bench/solvers.py sweep --solvers euler                  # Euler-100 reference + Euler 5..50, 100
    python bench/solvers.py sweep --solvers unipc,dpmpp_2m         # (one solver per run keeps a run < 20 min)
    python bench/solvers.py cache --solver unipc --steps 20        # MagCache thresholds x max_skips, timed
    python bench/solvers.py race --settings euler:50,euler:20,unipc:20,unipc:20:0.06:2   # interleaved timing
    python bench/solvers.py flops --solver unipc --steps 20 --thresholds 0.06,0.12   # A14B, analytic
    python bench/solvers.py table                                  # the sweep's table from what is stored
    python bench/solvers.py smoothness                             # is the model's velocity smooth in t?

Data: the learning benchmark's held-out pairs (``bench/learn_mini.py``: held-out time windows,
source camera i -> target camera j, the target camera's landmark map held), a fixed subset
of them (``--sources`` x ``--targets`` in every held-out window; the default 36 pairs include
12 to the held-out camera 4), one noise seed per pair (seed = pair index, as learn_mini).
Model: the ``learn`` config (data/learned_mini: small DiT + mini VAE, fp32, no CFG).

Every run goes through ``sampler.sample_program`` (the program ``sampler.render`` runs); the
sources and maps are encoded once, and each (solver, steps, cache) runs the compiled loop on
all pairs in one batch, then the latents are decoded. ``sweep`` checks once that this path
gives ``sampler.render``'s output. Scores (``facecam_jax.evaluation.scores``): PSNR of the
decoded uint8 videos to the Euler-100 output (the reference), PSNR / SSIM to the true target
views; the latents' relative L2 distance to the reference's. Outputs are stored under
``--out`` (one .npz per setting), so the runs of ``sweep`` add up and ``table`` reprints.

``cache`` times the loop alone (compiled, ``block_until_ready``) interleaved on the loaded
machine: uncached, cached A, uncached, cached B, ..., uncached; each cached time is divided
by the mean of the uncached runs on either side of it. Settings with the same plan (the
steps that run, ``MagCache.plan``) are one program with one output, so each plan runs once.

``flops``: seconds per A14B FaceCam video (``configs/facecam.py:nersemble``, 81 x 704 x 480,
CFG, both experts) at each TPU chip's dense bf16 peak from ``flops.dit_flops`` /
``flops.step_flops``: a skipped step still runs the embeddings and the head (the DiT with
no blocks); the cache's plan for A14B is the mini model's calibrated curve resampled, with
the expert switch step always run (``SampleOptions.of``), since no A14B curve exists here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402

SOLVERS = ("euler", "unipc", "dpmpp_2m")
STEPS = (5, 10, 15, 20, 30, 50, 100)
REFERENCE = ("euler", 100)
SECOND_REFERENCE = ("unipc", 100)
DEFAULT_SOURCES = (0, 2, 5, 7)
DEFAULT_TARGETS = (1, 4, 6)  # 4 is the held-out camera
TPU_PEAKS = ("TPU v5 lite", "TPU v5", "TPU v6 lite")  # chips.CHIPS keys: v5e, v5p, v6e


def load_line() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


@dataclasses.dataclass
class Output:
    latents: np.ndarray  # float32 [N, F, h, w, C]
    video: np.ndarray  # uint8 [N, T, H, W, 3]
    loop_s: float  # the compiled loop alone
    compile_s: float
    evaluations: tuple[int, int]  # (steps that ran the blocks, steps)

    def save(self, path: str, **meta) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez_compressed(path, latents=self.latents, video=self.video,
                            meta=json.dumps({"loop_s": self.loop_s, "compile_s": self.compile_s,
                                             "evaluations": list(self.evaluations), **meta}))

    @classmethod
    def load(cls, path: str) -> "Output":
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            return cls(f["latents"], f["video"], meta["loop_s"], meta["compile_s"], tuple(meta["evaluations"]))


class HeldoutBench:
    """The held-out pairs of ``config`` encoded once, and the mini model's sampling program on them.

    Use inside ``sharding.use_mesh(bench.mesh, bench.rules)``."""

    def __init__(self, config_arg: str, sources=DEFAULT_SOURCES, targets=DEFAULT_TARGETS, seed: int = 0):
        from facecam_jax import build
        from facecam_jax import sampling as sampler
        from facecam_jax.data import heldout, pipeline
        from facecam_jax.runtime.config_file import load_config

        self.config_arg = config_arg
        self.config = config = load_config(config_arg)
        d = config.data
        self.mesh, self.rules = build.mesh_and_rules(config)
        source = pipeline.heldout_source(d)
        self.held_cameras = tuple(int(c) for c in d.holdout_cameras)
        pairs = [(i, j) for i in sources for j in targets if i != j]
        self.pairs = heldout.heldout_pairs(source, pairs, d.height, d.width, seed=seed)
        self.seeds = [seed * 100_000 + k for k in range(len(self.pairs))]  # as bench/learn_mini.py
        self.sources = np.stack([p.source for p in self.pairs])
        self.conditions = np.stack([p.condition for p in self.pairs])
        self.truth = np.stack([p.target for p in self.pairs])
        self.groups = np.array(["held-out camera" if p.target_camera in self.held_cameras else "training cameras"
                                for p in self.pairs])
        self._sampler, self._build = sampler, build
        self._latents = None

    def describe(self) -> str:
        windows = sorted({p.start for p in self.pairs})
        n_held = int((self.groups == "held-out camera").sum())
        return (f"{len(self.pairs)} held-out pairs ({n_held} to the held-out camera {list(self.held_cameras)}): "
                f"windows starting at {windows}, sources {sorted({p.source_camera for p in self.pairs})} -> targets "
                f"{sorted({p.target_camera for p in self.pairs})}; seeds = pair index")

    def load(self, experts=None):
        """The VAE, the experts (default: ``load_experts`` of the config with its shipped weights)
        and the encoded pairs (the sampling program's inputs, ``sampling.make_inputs``)."""
        from facecam_jax import conditioning

        s = self._sampler
        self.vae = self._build.build_vae(self.config, self.mesh)
        self.experts = experts or s.load_experts(self.config, self.mesh, self.rules, self.config.sample.weights)
        self.ctx_cond, self.ctx_uncond, self.guidance = s.contexts(self.config, self.experts)
        self.inputs = s.make_inputs(conditioning.of(self.config), self.vae, self.sources, self.conditions, self.seeds,
                                    (self.ctx_cond, self.ctx_uncond), None, self.mesh)
        return self

    def config_with(self, overrides: str):
        from facecam_jax.runtime.config_file import load_config

        return load_config(f"{self.config_arg},{overrides}" if overrides else self.config_arg)

    def compile(self, overrides: str, experts=None):
        """(compiled loop, options, states) for the config with ``overrides`` (e.g. ``sample.solver=unipc``)."""
        from flax import nnx

        experts = experts or self.experts
        options = self._sampler.SampleOptions.of(self.config_with(overrides), len(experts.models),
                                                 guidance=self.guidance)
        program = self._sampler.sample_program(nnx.graphdef(experts.models[0]), options)
        states = tuple(nnx.state(m) for m in experts.models)
        t0 = time.perf_counter()
        compiled = program.fn.lower(states, self.inputs).compile()
        return compiled, options, states, time.perf_counter() - t0

    def loop(self, compiled, states) -> tuple[object, float]:
        import jax

        t0 = time.perf_counter()
        latents = jax.block_until_ready(compiled(states, self.inputs))
        return latents, time.perf_counter() - t0

    def decode(self, latents) -> np.ndarray:
        from facecam_jax.models.wan_vae import to_uint8

        return to_uint8(self.vae.decode(latents))

    def run(self, overrides: str, experts=None) -> Output:
        compiled, options, states, compile_s = self.compile(overrides, experts)
        latents, loop_s = self.loop(compiled, states)
        return Output(np.asarray(latents), self.decode(latents), loop_s, compile_s, options.evaluations())

    def render(self, overrides: str) -> np.ndarray:
        """``sampler.render`` itself on the pairs (one batch), for the check that ``run`` is its path."""
        return self._sampler.render(self.config_with(overrides), self.experts, self.vae, self.sources,
                                    self.conditions, self.seeds, mesh=self.mesh, batch=len(self.pairs),
                                    show_progress=False)


# ------------------------------------------------------------------ scores


def psnr_each(videos: np.ndarray, refs: np.ndarray) -> np.ndarray:
    from facecam_jax.evaluation.scores import psnr

    return np.array([psnr(a, b) for a, b in zip(videos, refs)])


def ssim_each(videos: np.ndarray, refs: np.ndarray) -> np.ndarray:
    from facecam_jax.evaluation.scores import ssim

    return np.array([ssim(a, b) for a, b in zip(videos, refs)])


def latent_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 distance of two batches of latents, ``||a - b|| / ||b||`` over the whole batch."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def truth_scores(bench: HeldoutBench, video: np.ndarray) -> dict[str, tuple[float, float]]:
    """{group: (mean PSNR, mean SSIM) to the true target views} for the training / held-out cameras."""
    p, s = psnr_each(video, bench.truth), ssim_each(video, bench.truth)
    return {g: (float(p[bench.groups == g].mean()), float(s[bench.groups == g].mean()))
            for g in ("training cameras", "held-out camera") if (bench.groups == g).any()}


def truth_cell(t: dict) -> str:
    return " ; ".join(f"{t[g][0]:.2f} / {t[g][1]:.3f}" if g in t else "-" for g in ("training cameras", "held-out camera"))


# ------------------------------------------------------------------ sweep


def output_path(out: str, solver: str, steps: int) -> str:
    return os.path.join(out, "outputs", f"{solver}_{steps}.npz")


def sweep(args) -> None:
    from facecam_jax import sharding as sh
    bench = HeldoutBench(**TABLE_BENCH)
    print(f"machine: {machine()} | {load_line()}")
    print(bench.describe())
    todo = [REFERENCE] + [(solver, n) for solver in args.solvers.split(",") for n in map(int, args.steps.split(","))]
    with sh.use_mesh(bench.mesh, bench.rules):
        bench.load()
        checked = os.path.exists(os.path.join(args.out, "render_check.json"))
        for solver, n in dict.fromkeys(todo):
            path = output_path(args.out, solver, n)
            if os.path.exists(path) and not args.force:
                print(f"{solver} {n}: stored ({path})")
                continue
            out = bench.run(f"sample.solver={solver},sample.num_steps={n}")
            out.save(path, solver=solver, steps=n, machine=machine(), load=os.getloadavg()[0])
            print(f"{solver} {n}: loop {out.loop_s:.1f} s, compile {out.compile_s:.1f} s | {load_line()}", flush=True)
            if not checked and (solver, n) == ("euler", 20):
                # The bench's path (encode all at once, the compiled program, decode) against render itself.
                rendered = bench.render("sample.solver=euler,sample.num_steps=20")
                diff = int(np.abs(rendered.astype(int) - out.video.astype(int)).max())
                with open(os.path.join(args.out, "render_check.json"), "w") as f:
                    json.dump({"setting": "euler 20", "max_abs_diff_grey_levels": diff}, f)
                print(f"check: sampler.render vs this bench's path, euler 20: max |diff| = {diff} grey levels")
                checked = True
    print_table(args.out, bench)


def print_table(out: str, bench: HeldoutBench | None = None) -> None:
    bench = bench or HeldoutBench(**TABLE_BENCH)
    ref_path = output_path(out, *REFERENCE)
    if not os.path.exists(ref_path):
        raise SystemExit(f"no reference output {ref_path}: run `python bench/solvers.py sweep` first")
    ref = Output.load(ref_path)
    stored = {}
    for solver in SOLVERS:
        for n in STEPS:
            path = output_path(out, solver, n)
            if os.path.exists(path):
                stored[(solver, n)] = Output.load(path)
    second = stored.get(SECOND_REFERENCE)
    print("\nPSNR (dB) of each output to the Euler-100 output / to the UniPC-100 output, mean over pairs:\n")
    print("| steps | " + " | ".join(SOLVERS) + " |")
    print("|---|" + "---|" * len(SOLVERS))
    for n in STEPS:
        cells = []
        for solver in SOLVERS:
            o = stored.get((solver, n))
            if o is None:
                cells.append("-")
                continue
            to = [("ref" if (solver, n) == r else f"{psnr_each(o.video, x.video).mean():.2f}") if x is not None else "-"
                  for r, x in ((REFERENCE, ref), (SECOND_REFERENCE, second))]
            cells.append(" / ".join(to))
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nEvery setting: PSNR to the reference (mean, and the worst pair), to UniPC-100 (a second-order "
          "100-step solution, nearer the ODE's), and the held-out PSNR / SSIM to the TRUE target views (mean over "
          "the pairs of each target group):\n")
    print("| solver | steps | PSNR to Euler-100 (dB) | worst pair (dB) | latent rel. L2 | PSNR to UniPC-100 (dB) (latent) | "
          "PSNR / SSIM to truth, training cameras | PSNR / SSIM to truth, held-out camera | loop (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (solver, n), o in stored.items():
        p = psnr_each(o.video, ref.video)
        t = truth_scores(bench, o.video)
        cells = [f"{t[g][0]:.2f} / {t[g][1]:.3f}" if g in t else "-" for g in ("training cameras", "held-out camera")]
        ref_cells = ("reference", "-", "-") if (solver, n) == REFERENCE else (
            f"{p.mean():.2f}", f"{p.min():.2f}", f"{latent_rel(o.latents, ref.latents):.4f}")
        to_second = "-" if second is None or (solver, n) == SECOND_REFERENCE else \
            f"{psnr_each(o.video, second.video).mean():.2f} ({latent_rel(o.latents, second.latents):.4f})"
        print(f"| {solver} | {n} | " + " | ".join(ref_cells) + f" | {to_second} | {cells[0]} | {cells[1]} | "
              f"{o.loop_s:.1f} |")
    print("\nloop (s): the compiled loop alone, one run per setting with all pairs in one batch; the machine's "
          "load varied between runs, so compare them only roughly (every solver evaluates the DiT once a step).")


TABLE_BENCH: dict = {"config_arg": "learn"}  # main() sets the pairs


# ------------------------------------------------------------------ cache


def cache(args) -> None:
    from facecam_jax import sharding as sh
    bench = HeldoutBench(**TABLE_BENCH)
    print(f"machine: {machine()} | {load_line()}")
    print(bench.describe())
    base = f"sample.solver={args.solver},sample.num_steps={args.steps}"
    settings = [(float(t), int(k)) for t in args.thresholds.split(",") for k in args.max_skips.split(",")]
    with sh.use_mesh(bench.mesh, bench.rules):
        bench.load()
        # Group the settings by their plan (same plan: same program decisions, same output).
        plans: dict[tuple, list] = {}
        for t, k in settings:
            options = bench._sampler.SampleOptions.of(
                bench.config_with(f"{base},sample.cache=magcache,sample.cache_threshold={t},"
                                  f"sample.cache_max_skips={k}"), 1, guidance=bench.guidance)
            plans.setdefault(tuple(bool(r) for r in options.cache.plan()), []).append((t, k))
        uncached, _, u_states, u_compile = bench.compile(base)
        print(f"uncached: compiled in {u_compile:.1f} s; {len(plans)} distinct plans among {len(settings)} settings")
        runs = []
        for plan, members in plans.items():
            t, k = members[0]
            compiled, options, states, c_s = bench.compile(
                f"{base},sample.cache=magcache,sample.cache_threshold={t},sample.cache_max_skips={k}")
            runs.append((plan, members, compiled, options, states))
        # Interleaved timing: U C1 U C2 ... U, repeated --repeats times.
        u_times, c_times = [], {plan: [] for plan in plans}
        outputs = {}
        u_latents = None
        for r in range(args.repeats):
            lat, s = bench.loop(uncached, u_states)
            u_times.append(s)
            if u_latents is None:
                u_latents = np.asarray(lat)
            for plan, members, compiled, options, states in runs:
                lat, s = bench.loop(compiled, states)
                c_times[plan].append((len(u_times) - 1, s))
                outputs.setdefault(plan, np.asarray(lat))
                lat, s = bench.loop(uncached, u_states)
                u_times.append(s)
                assert np.array_equal(np.asarray(lat), u_latents), "the uncached program is not deterministic"
            print(f"repeat {r + 1}/{args.repeats} done | {load_line()}", flush=True)
        u_video = bench.decode(u_latents)
        ref_path = output_path(args.out, *REFERENCE)
        ref = Output.load(ref_path) if os.path.exists(ref_path) else None
        u_truth = truth_scores(bench, u_video)
        print(f"\nMagCache on {args.solver}-{args.steps}, {len(bench.pairs)} pairs in one batch; loop times: "
              f"median over {args.repeats} interleaved repeats of (cached / mean of the two uncached runs around "
              f"it); uncached loop median {np.median(u_times):.1f} s ({len(u_times)} runs, "
              f"{np.min(u_times):.1f}-{np.max(u_times):.1f} s).\n")
        print("| threshold | max_skips | evaluations K of N | steps skipped | loop time / uncached | speed-up | "
              "PSNR to uncached (dB) | PSNR to Euler-100 (dB) | held-out PSNR / SSIM to truth (train cams ; cam 4) |")
        print("|---|---|---|---|---|---|---|---|---|")
        ref_cell = "-" if ref is None else f"{psnr_each(u_video, ref.video).mean():.2f}"
        print(f"| - (uncached) | - | {args.steps} of {args.steps} | - | 1 | 1.00x | - | {ref_cell} | "
              f"{truth_cell(u_truth)} |")
        records = []
        for plan, members, compiled, options, states in runs:
            ratios = [s / np.mean(u_times[i:i + 2]) for i, s in c_times[plan]]
            ratio = float(np.median(ratios))
            video = bench.decode(outputs[plan])
            p_u = psnr_each(video, u_video).mean()
            p_ref = "-" if ref is None else f"{psnr_each(video, ref.video).mean():.2f}"
            t = truth_scores(bench, video)
            ran, n = options.evaluations()
            skipped = [i for i, x in enumerate(plan) if not x]
            for th, k in members:
                print(f"| {th} | {k} | {ran} of {n} | {skipped} | {ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                      f"{1 / ratio:.2f}x | {p_u:.2f} | {p_ref} | {truth_cell(t)} |")
                records.append({"threshold": th, "max_skips": k, "evaluations": [ran, n], "skipped": skipped,
                                "time_ratio": ratio, "time_ratios": ratios, "psnr_to_uncached": float(p_u)})
        os.makedirs(args.out, exist_ok=True)
        name = f"cache_{args.solver}_{args.steps}_t{args.thresholds.replace(',', '_')}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"machine": machine(), "uncached_loop_s": u_times, "settings": records}, f, indent=1)
    print(f"\ndone | {load_line()}")


# ------------------------------------------------------------------ race


def setting_overrides(spec: str) -> str:
    """``solver:steps[:threshold:max_skips]`` -> config overrides."""
    parts = spec.split(":")
    out = f"sample.solver={parts[0]},sample.num_steps={int(parts[1])}"
    if len(parts) > 2:
        out += f",sample.cache=magcache,sample.cache_threshold={float(parts[2])},sample.cache_max_skips={int(parts[3])}"
    return out


def race(args) -> None:
    """Loop time of whole settings against each other, interleaved: A B C ... A B C ..., ``--repeats``
    rounds; each setting's median, and its ratio to the first setting's median."""
    from facecam_jax import sharding as sh
    bench = HeldoutBench(**TABLE_BENCH)
    print(f"machine: {machine()} | {load_line()}")
    print(bench.describe())
    specs = args.settings.split(",")
    second_path = output_path(args.out, *SECOND_REFERENCE)
    second = Output.load(second_path) if os.path.exists(second_path) else None
    with sh.use_mesh(bench.mesh, bench.rules):
        bench.load()
        programs = [bench.compile(setting_overrides(spec)) for spec in specs]
        times = {spec: [] for spec in specs}
        outputs = {}
        for r in range(args.repeats):
            for spec, (compiled, options, states, _) in zip(specs, programs):
                latents, seconds = bench.loop(compiled, states)
                times[spec].append(seconds)
                outputs.setdefault(spec, latents)
            print(f"round {r + 1}/{args.repeats} | {load_line()}", flush=True)
        base = float(np.median(times[specs[0]]))
        print(f"\nLoop times, {len(bench.pairs)} pairs in one batch, {args.repeats} interleaved rounds "
              f"(median; range):\n")
        print("| setting | DiT evaluations | loop (s) | speed-up over " + specs[0] + " | PSNR to UniPC-100 (dB) |")
        print("|---|---|---|---|---|")
        for spec, (compiled, options, states, _) in zip(specs, programs):
            t = float(np.median(times[spec]))
            ran, n = options.evaluations()
            p = "-" if second is None else f"{psnr_each(bench.decode(outputs[spec]), second.video).mean():.2f}"
            print(f"| {spec} | {ran} of {n} | {t:.1f} ({min(times[spec]):.1f}-{max(times[spec]):.1f}) | "
                  f"{base / t:.2f}x | {p} |")
        with open(os.path.join(args.out, "race.json"), "w") as f:
            json.dump({"machine": machine(), "times": times}, f, indent=1)
    print(f"\ndone | {load_line()}")


# ------------------------------------------------------------------ smoothness


def smoothness(args) -> None:
    """How smooth the model's velocity is in t: v(x_t, t) on the straight path x_t = (1 - s) z0 + s eps
    (z0: the stored UniPC-100 output, eps: its noise) every 0.5 timestep units; per window of
    10 units, the path length of v (sum of the 0.5-unit changes) over its chord (the change
    across the window). A function smooth at this scale gives ~1; an oscillating one more."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from facecam_jax import conditioning
    from facecam_jax import sharding as sh

    bench = HeldoutBench(**TABLE_BENCH)
    print(f"machine: {machine()} | {load_line()}")
    path = output_path(args.out, *SECOND_REFERENCE)
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: run `python bench/solvers.py sweep --solvers unipc` first")
    n = args.pairs
    with sh.use_mesh(bench.mesh, bench.rules):
        bench.load()
        inputs = jax.tree.map(lambda a: a[:n], bench.inputs)
        z0 = jnp.asarray(Output.load(path).latents[:n])
        noise = inputs.noise
        graphdef, state = nnx.split(bench.experts.models[0])
        kind = conditioning.of(bench.config)
        fn = jax.jit(lambda st, x, t: kind.velocity(nnx.merge(graphdef, st), x, inputs.source, inputs.condition, t,
                                                    inputs.ctx_cond))
        starts = [float(t) for t in args.windows.split(",")]
        wanted = sorted({round(a + 0.5 * k, 1) for a in starts for k in range(21)})
        vs = {}
        for t in wanted:
            x = (1 - t / 1000) * z0 + (t / 1000) * noise
            vs[t] = np.asarray(fn(state, x, jnp.full((n,), t, jnp.float32)))
    print(f"{n} pairs; v(x_t, t) every 0.5 timestep units on the straight path from the UniPC-100 output to its "
          "noise\n")
    print("| t window | ‖v‖ | path length over 0.5-unit steps | chord | path / chord |")
    print("|---|---|---|---|---|")
    for a in starts:
        seg = [vs[round(a + 0.5 * k, 1)] for k in range(21)]
        length = sum(float(np.linalg.norm(seg[k + 1] - seg[k])) for k in range(20))
        chord = float(np.linalg.norm(seg[-1] - seg[0]))
        print(f"| {a:.0f}-{a + 10:.0f} | {np.linalg.norm(seg[0]):.1f} | {length:.2f} | {chord:.2f} | "
              f"{length / chord:.2f} |")


# ------------------------------------------------------------------ analytic


def a14b_seconds(solver: str, steps: int, cache_setting: tuple[float, int, float] | None,
                 calibration: str) -> dict:
    """FLOPs and seconds at each TPU chip's peak for one A14B FaceCam video (81 x 704 x 480, CFG 5)."""
    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax.perf import chips, flops
    from facecam_jax.runtime.config_file import load_config

    overrides = f"nersemble,sample.solver={solver},sample.num_steps={steps}"
    if cache_setting is not None:
        t, k, retention = cache_setting
        overrides += (f",sample.cache=magcache,sample.cache_threshold={t},sample.cache_max_skips={k},"
                      f"sample.cache_retention={retention},sample.cache_calibration={calibration}")
    config = load_config(overrides)
    parts = flops.step_flops(config, "sample")  # every step a full forward, plus the VAE
    dit_config = build.dit_config(config)
    tokens, out_tokens = build.token_counts(config)
    cfg_batch = 2 if config.sample.cfg_scale != 1.0 else 1
    full = flops.dit_flops(dit_config, cfg_batch, tokens, out_tokens)["forward"]
    no_blocks = flops.dit_flops(dit_config.replace(num_layers=0), cfg_batch, tokens, out_tokens)["forward"]
    options = sampler.SampleOptions.of(config, build.num_experts(config))
    ran, n = options.evaluations()
    dit = ran * full + (n - ran) * no_blocks
    total = dit + parts["vae"]
    assert abs(n * full - parts["forward"]) <= 1e-6 * parts["forward"]  # step_flops' count
    return {"evaluations": (ran, n), "dit_flops": dit, "vae_flops": parts["vae"], "total_flops": total,
            "seconds": {chips.CHIPS[k].name: total / chips.CHIPS[k].peak_flops for k in TPU_PEAKS},
            "skipped": [] if options.cache is None else [i for i, x in enumerate(options.cache.plan()) if not x]}


def flops_table(args) -> None:
    from facecam_jax.runtime.config_file import load_config

    calibration = load_config("learn").sample.cache_calibration
    print(f"machine: {machine()} (analytic: nothing runs)")
    rows = [("Euler-50 (the paper's)", a14b_seconds("euler", 50, None, calibration))]
    rows.append((f"{args.solver}-{args.steps}", a14b_seconds(args.solver, args.steps, None, calibration)))
    for threshold in (args.thresholds.split(",") if args.thresholds else []):
        rows.append((f"{args.solver}-{args.steps} + MagCache (threshold {threshold}, max_skips "
                     f"{args.max_skips}, retention {args.retention})",
                     a14b_seconds(args.solver, args.steps, (float(threshold), args.max_skips, args.retention),
                                  calibration)))
    base = rows[0][1]["total_flops"]
    names = list(rows[0][1]["seconds"])
    print("\nOne A14B FaceCam video (configs/facecam.py:nersemble: 81 x 704 x 480 = 55,440 tokens, CFG 5 = batch "
          "2, one 14B expert per step, VAE encode of source + camera and decode), at one chip's dense bf16 peak "
          "(MFU 100%):\n")
    print("| setting | DiT evaluations | FLOPs (DiT + VAE) | " + " | ".join(f"s at {n} peak" for n in names)
          + " | speed-up |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for label, r in rows:
        ran, n = r["evaluations"]
        secs = " | ".join(f"{r['seconds'][k]:.0f}" for k in names)
        print(f"| {label} | {ran} of {n} | {r['total_flops'] / 1e15:.1f} PFLOP ({r['dit_flops'] / 1e15:.1f} + "
              f"{r['vae_flops'] / 1e15:.2f}) | {secs} | {base / r['total_flops']:.2f}x |")
    for label, r in rows:
        if r["skipped"]:
            print(f"\n{label}: skipped steps {r['skipped']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="learn")
    p.add_argument("--out", default="runs/bench-solvers", help="stored outputs (.npz per setting) and JSON")
    p.add_argument("--sources", default=",".join(map(str, DEFAULT_SOURCES)), help="source cameras of the pairs")
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)), help="target cameras of the pairs")
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--solvers", default="euler")
    s.add_argument("--steps", default=",".join(map(str, STEPS)))
    s.add_argument("--force", action="store_true", help="re-run settings already stored")
    sub.add_parser("table")
    c = sub.add_parser("cache")
    c.add_argument("--solver", default="unipc")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--thresholds", default="0,0.03,0.06,0.12,0.24")
    c.add_argument("--max_skips", default="2,3,4")
    c.add_argument("--repeats", type=int, default=2)
    r = sub.add_parser("race")
    r.add_argument("--settings", default="euler:50,euler:20,unipc:20,unipc:20:0.06:2,unipc:20:0.12:2",
                   help="solver:steps[:threshold:max_skips], the first is the baseline")
    r.add_argument("--repeats", type=int, default=2)
    m = sub.add_parser("smoothness")
    m.add_argument("--pairs", type=int, default=6)
    m.add_argument("--windows", default="5,25,50,100,200,300,500,800,980", help="t at the start of each 10-unit window")
    f = sub.add_parser("flops")
    f.add_argument("--solver", default="unipc")
    f.add_argument("--steps", type=int, default=20)
    f.add_argument("--thresholds", default="", help="MagCache thresholds, e.g. 0.06,0.12 (none: no cache rows)")
    f.add_argument("--max_skips", type=int, default=2)
    f.add_argument("--retention", type=float, default=0.2)
    args = p.parse_args(argv)
    global TABLE_BENCH
    TABLE_BENCH = dict(config_arg=args.config, sources=tuple(map(int, args.sources.split(","))),
                       targets=tuple(map(int, args.targets.split(","))))
    {"sweep": sweep, "table": lambda a: print_table(a.out), "cache": cache, "flops": flops_table,
     "smoothness": smoothness, "race": race}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
