"""FaceCam training on a GKE TPU slice: prints a JobSet manifest (JSON, which kubectl applies as
it does YAML) with one pod per TPU host, each running ``python -m facecam_jax.train`` with
``config.distributed.auto`` (jax finds the other hosts of the slice itself).

    python tools/cluster/tpu_jobset.py --topology v5p:4x4x4 --image REGISTRY/facecam-jax:TAG \\
        --config configs/facecam.py:nersemble --workdir gs://BUCKET/run > facecam.json
    kubectl apply -f facecam.json

Needs the JobSet controller on the cluster (https://jobset.sigs.k8s.io) and a TPU node pool of
that topology. Check that the recipe fits the slice first (no TPU needed):
``python -m facecam_jax.aot --config <config> --topology v5p:4x4x4``. The manifest is checked
offline by tests/test_cluster_recipes.py: hosts x chips per host is the slice libtpu describes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

# GKE's accelerator label and chips per host (VM) of each TPU generation's multi-host slices.
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 4),
    "v5e": ("tpu-v5-lite-podslice", 4),
    "v5p": ("tpu-v5p-slice", 4),
    "v6e": ("tpu-v6e-slice", 4),
}


def slice_shape(topology: str) -> tuple[str, str, int, int]:
    """``v5p:4x4x4`` -> (generation, "4x4x4", hosts, chips per host); ValueError if malformed."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", topology)
    if not match:
        raise ValueError(f"--topology must be GEN:AxB[xC] with GEN one of {', '.join(ACCELERATORS)}, got {topology!r}")
    generation, dims = match.groups()
    chips = math.prod(int(d) for d in dims.split("x"))
    per_host = min(ACCELERATORS[generation][1], chips)
    if chips % per_host:
        raise ValueError(f"{topology}: {chips} chips do not split into hosts of {per_host}")
    return generation, dims, chips // per_host, per_host


def manifest(topology: str, image: str, config: str, workdir: str, name: str = "facecam-train",
             extra: tuple[str, ...] = ()) -> dict:
    """The JobSet: one replicated job whose ``hosts`` pods (one per TPU VM) run together."""
    generation, dims, hosts, per_host = slice_shape(topology)
    command = ["python", "-m", "facecam_jax.train", f"--config={config}", f"--workdir={workdir}",
               "--config.distributed.auto=True", *extra]
    container = {
        "name": "train",
        "image": image,
        "command": command,
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # TPU runtime, jax coordinator
        "securityContext": {"privileged": True},
        "resources": {"requests": {"google.com/tpu": per_host}, "limits": {"google.com/tpu": per_host}},
    }
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": ACCELERATORS[generation][0],
                         "cloud.google.com/gke-tpu-topology": dims},
        "containers": [container],
    }
    job = {"backoffLimit": 0, "completions": hosts, "parallelism": hosts, "completionMode": "Indexed",
           "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                   "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {"maxRestarts": 0},
                 "replicatedJobs": [{"name": "slice", "replicas": 1, "template": {"spec": job}}]},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="the slice: v5p:4x4x4, v6e:4x4, v5e:4x8, ...")
    p.add_argument("--image", required=True, help="a container image with facecam-jax and jax[tpu] installed")
    p.add_argument("--config", required=True, help="configs/facecam.py[:variant,key=value]")
    p.add_argument("--workdir", required=True, help="checkpoints and logs (a bucket every host sees)")
    p.add_argument("--name", default="facecam-train")
    args, extra = p.parse_known_args(argv)
    try:
        out = manifest(args.topology, args.image, args.config, args.workdir, args.name, tuple(extra))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
