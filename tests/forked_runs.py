"""Command lines run as processes forked from one warm interpreter: ``run("-m", "facecam_jax.train", ...)``.

Each command line still runs in a process of its own, with its own argv, exit code, stdout
and stderr, through the entry point's real ``__main__`` code; only the import of jax, flax,
orbax and the project, which is most of a usage error's cost (~5 s a run on two cores), is
done once, before the forks. Nothing here initialises a JAX backend, so forking is safe.

``run`` starts the interpreter (``python tests/forked_runs.py``) at its first call and keeps it
for the session (``close`` ends it). Protocol: one JSON request per line on its stdin,
``{"argv": [...], "timeout": seconds, "env": {...}}``, where argv is what follows ``python``
(``-m module ...``, ``-c code ...`` or ``script.py ...``) and env is set in the child before it runs; one JSON
answer per line on its stdout, ``{"returncode": int, "stdout": str, "stderr": str}``
(returncode -9: killed at the timeout). The interpreter runs from the repository root with
``JAX_PLATFORMS=cpu`` and the checkout first on the path.
"""

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

# The entry points' heavy imports; the entry modules themselves are not imported here (they
# define absl flags when imported, and each child imports its own as __main__).
WARM = ("facecam_jax.training.trainer", "facecam_jax.sampling.render", "facecam_jax.evaluation.report",
        "facecam_jax.camera.condition", "facecam_jax.checkpoints.dit", "facecam_jax.fit.programs", "facecam_jax.perf.report")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVER: list[subprocess.Popen] = []


def run(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> SimpleNamespace:
    """``python *args`` from the repository root, forked: ``returncode``, ``stdout``, ``stderr``."""
    if not _SERVER:
        # The checkout first on the path: the tools/ scripts run from it even where the
        # installed package points elsewhere.
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
        server_env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=server_env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if json.loads(server.stdout.readline() or "{}") != {"ready": True}:
            raise RuntimeError("tests/forked_runs.py did not start")
        _SERVER.append(server)
    server = _SERVER[0]
    server.stdin.write(json.dumps({"argv": list(args), "timeout": timeout, "env": env or {}}) + "\n")
    server.stdin.flush()
    answer = server.stdout.readline()
    if not answer:
        raise RuntimeError(f"tests/forked_runs.py exited (code {server.wait()}) while running {args}")
    return SimpleNamespace(**json.loads(answer))


def close() -> None:
    while _SERVER:
        server = _SERVER.pop()
        server.stdin.close()
        server.wait(timeout=60)


def _child(argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  as Python itself: the traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str], timeout: float, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(argv, env, out, err)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = -9
                break
            time.sleep(0.02)
        texts = []
        for path in (out, err):
            with open(path, errors="replace") if os.path.exists(path) else open(os.devnull) as f:
                texts.append(f.read())
    return {"returncode": code, "stdout": texts[0], "stderr": texts[1]}


def main() -> None:
    for name in WARM:
        importlib.import_module(name)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write into the answers
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(_run(request["argv"], float(request["timeout"]), request.get("env", {}))), file=answers, flush=True)


if __name__ == "__main__":
    main()
