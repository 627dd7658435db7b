"""Training-data throughput at FaceCam size (81 x 704 x 480) with every augmentation.

    python bench/data_pipeline.py [--frames 81 --height 704 --width 480 --samples 6 --workers 2]

Data: the carphone mini multi-view dataset rendered at the output size (built once and
cached; 8 cameras, 120 frames), and carphone itself (176x144, upscaled) as in-the-wild
video. The clip has 120 frames, so an 81-frame multi-view sample uses stride 1 here (the
paper's stride 3 decodes, but does not convert, two more frames per used frame: the
`decode, grab only` row prices that). Per-stage times call the pipeline's own functions on
one sample's data; the end-to-end rows run the real Grain pipeline (`make_train_iterator`),
pinned to one CPU core (samples/s per core) and with worker processes.
"""

import argparse
import os
import platform
import time

import numpy as np


def _timed(fn, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _iterate(config, batches):
    from facecam_jax.data import pipeline

    iterator = pipeline.make_train_iterator(config)
    next(iterator)  # start-up (worker spawn, first decode) is not throughput
    start = time.perf_counter()
    kinds = np.concatenate([next(iterator)["kind"] for _ in range(batches)])
    seconds = time.perf_counter() - start
    del iterator  # stops the workers and frees their shared-memory batches
    return seconds / len(kinds), kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--samples", type=int, default=6, help="samples per end-to-end run")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the last run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import importlib.util

    import cv2

    from facecam_jax.camera import draw
    from facecam_jax.data import augment, mini_dataset, sources

    config_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                               "facecam.py")
    spec = importlib.util.spec_from_file_location("facecam_config", config_path)
    facecam_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(facecam_config)

    num_frames, height, width = args.frames, args.height, args.width
    seconds, built = _timed(lambda: mini_dataset.build(height, width, 8, num_workers=2))
    print(f"mini dataset {height}x{width}: {seconds:.1f} s (0 when cached) at {built.root}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores usable, "
          f"load average {os.getloadavg()[0]:.1f}; sample {num_frames}x{height}x{width}")
    if hasattr(os, "sched_setaffinity"):
        all_cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(all_cores)})  # per-core numbers: one core for every thread
    cv2.setNumThreads(1)

    # Per-stage costs of one multi-view sample with 4 shots (the most decoding).
    mv = sources.multiview_source("nersemble", built.nersemble_root, frames=num_frames, stride=1)
    seq, start = mv[0]["sequence"], mv[0]["start"]
    times = start + np.arange(num_frames)
    cam = seq.cameras[0]
    crop = augment.cover_crop_params(cam.height, cam.width, height, width)
    rows = []
    t_decode, raw = _timed(lambda: cam.read(times), args.repeats)
    rows.append(("decode + RGB, source", t_decode))
    rows.append(("decode + RGB, target shots (4 cameras)", _timed(lambda: [
        seq.cameras[1 + k].read(times[k * 21:(k + 1) * 21]) for k in range(4)], args.repeats)[0]))

    def grab_only():
        cap = cv2.VideoCapture(cam.path)
        for _ in range(num_frames):
            cap.grab()
        cap.release()

    rows.append(("decode, grab only (cost of a skipped frame, x frames)", _timed(grab_only, args.repeats)[0]))
    t_masks, masks = _timed(lambda: cam.read_masks(times), args.repeats)
    rows.append(("masks read (zarr), source + target", 2 * t_masks))
    rows.append(("cover crop, frames + masks, source + target", 2 * _timed(lambda: (
        augment.apply_cover_crop(raw, crop, height, width),
        augment.apply_cover_crop(masks, crop, height, width)), args.repeats)[0]))
    anchor = augment.cover_crop_points(cam.store.read_landmarks([start])[0][0], crop, height, width)
    rows.append(("landmark maps, 4 anchors drawn + held", _timed(lambda: [
        draw.draw_landmark_map(anchor, height, width) for _ in range(4)], args.repeats)[0]))
    frames = augment.apply_cover_crop(raw, crop, height, width)
    masks = augment.apply_cover_crop(masks, crop, height, width)
    rows.append(("Alg. 1: composite background, source + target", 2 * _timed(
        lambda: augment.composite(frames, masks, (10, 200, 30)), args.repeats)[0]))
    scales, positions = np.full((num_frames,), 0.8), np.full((num_frames, 2), 0.3)
    rows.append(("Alg. 1: source still scale", _timed(
        lambda: augment.apply_zoom_pan(frames, scales, positions), args.repeats)[0]))
    scales = augment.linear_motion(1.05, 1.2, num_frames)
    positions = augment.linear_motion([0.2, 0.8], [0.7, 0.1], num_frames)
    rows.append(("Alg. 2: zoom/pan, target + landmark maps", 2 * _timed(
        lambda: augment.apply_zoom_pan(frames, scales, positions), args.repeats)[0]))
    width_col = max(len(name) for name, _ in rows)
    print(f"\nper-stage, one multi-view sample ({num_frames} frames, 1 core):")
    for name, seconds in rows:
        print(f"  {name:<{width_col}}  {seconds * 1e3:8.1f} ms")
    used = sum(s for n, s in rows if "grab only" not in n)
    print(f"  {'sum (stride 1)':<{width_col}}  {used * 1e3:8.1f} ms")

    # The real transform chain and Grain pipeline.
    base = (f"mini,frames={num_frames},height={height},width={width},stride=1,batch_size=1,"
            f"data.mini.height={height},data.mini.width={width},prefetch=1")
    print(f"\nend-to-end Grain pipeline (make_train_iterator), {args.samples} samples each:")
    for name, ratio in (("multi-view only", 0.0), ("in-the-wild only", 1.0)):
        config = facecam_config.get_config(f"{base},wild_ratio={ratio}")
        per_sample, _ = _iterate(config, args.samples)
        print(f"  {name:<18} 1 core, no workers:   {1.0 / per_sample:6.3f} samples/s "
              f"({per_sample:.2f} s per sample)")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, all_cores)
    config = facecam_config.get_config(f"{base},wild_ratio=0.0,workers={args.workers}")
    per_sample, _ = _iterate(config, args.samples)
    print(f"  {'multi-view only':<18} {args.workers} worker processes: {1.0 / per_sample:6.3f} samples/s "
          f"({1.0 / per_sample / args.workers:.3f} per worker; {cores} cores usable)")


if __name__ == "__main__":
    main()
