"""pass@k of a causal LM on HumanEval-style problems: sample completions, run each against its tests.

A problem is one JSONL line in HumanEval's format: ``task_id``, ``prompt`` (a signature and docstring),
``test`` (source defining ``check(candidate)``) and ``entry_point`` (the function's name). The package
ships six small hand-written ones (``kdlora/assets/humaneval_mini.jsonl``) to check the plumbing.

A completion runs as ``prompt + completion + test + check(entry_point)`` in its own process
(``sys.executable -I``; a fresh temporary directory as working directory, HOME and TMPDIR; an environment
without proxies or credentials; address space, CPU time and file size limited with ``resource``), stopped
at `timeout` seconds. It passes only on proof that ``check`` returned: the harness sends a random token
through a pipe that the runner reads and closes before the program starts, and the runner writes it to
a second pipe after the program's last statement, ``check(entry_point)``, returned; the harness compares
it byte for byte (and wants exit status 0). Exiting early (``sys.exit(0)``, ``os._exit(0)``), printing
anything or writing to the pipe without the token is a failure.

Generated code runs only when allowed explicitly (``allow_code_execution=True``, ``--allow-code-execution``)
and under OS isolation (``isolation="auto"``: bubblewrap if it works here, else util-linux ``unshare``
and ``setpriv`` with unprivileged user namespaces). Each program gets:

- network: a namespace of its own with nothing but its own loopback, so no connection leaves it
  (127.0.0.1 and abstract Unix sockets are the namespace's, not the host's);
- files: a mount namespace of its own where every mount is read-only, nosuid and nodev except the
  temporary directory; /dev holds only null, zero, full, random and urandom (bwrap adds tty, shm and its
  own ptys); /tmp, /var/tmp and /run, where daemons keep their Unix sockets, are empty (but for the
  harness's own directory); /proc is the new PID namespace's, read-only;
- processes: a PID namespace of its own, so when the program ends or is killed at the timeout every
  process it started ends with it (``setsid`` and double forks included);
- privileges: no capabilities (so the mounts cannot be undone) and ``no_new_privs``.

Not guaranteed: files stay readable (the program can read what its user can, secrets in a home directory
included, and put some of it in its result's ``detail``, though not send it anywhere); Unix sockets
elsewhere in the file system (e.g. under a home directory) can still be connected to; the number of
processes is not limited, nor their total CPU use within the timeout; the token is in the program's own
process, so code that searches the interpreter's frames for it could forge a pass; kernel exploits
escape namespaces. Setting the sandbox up adds about 0.1 s to each run. Where neither tool works,
running refuses unless ``isolation="none"`` (``--no-isolation``) is asked for: then only the limits, the
directory, the environment and the token check apply, and the code can read, write, delete and connect
to anything its user can. POSIX only.

pass@k is the unbiased estimator of the Codex paper (Chen et al. 2021):
``1 - C(n-c, k) / C(n, k)`` for n samples of which c pass, computed as a stable product.

    python -m kdlora.eval.passk --model DIR [--problems FILE] --n 10 --k 1 --k 10 --out DIR --allow-code-execution
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from kdlora.io import write_atomic

MINI_PROBLEMS = Path(__file__).parents[1] / "assets" / "humaneval_mini.jsonl"
# Where a function-level completion ends (Codex's stop sequences, written to start a new top-level statement).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
DETAIL_CHARS = 300
ISOLATIONS = ("auto", "bwrap", "unshare", "none")

# The program's runner: limits, then the program; after it returns (so after `check(entry_point)`), the
# token read from `nonce_fd` goes to `proof_fd`. The token lives only in `main`'s frame: it is in no file,
# no argument, no environment variable and no global of the program.
RUNNER = r'''
import os, sys

def main():
    limits = {limits!r}
    try:
        import resource
        for name, value in limits.items():
            which = getattr(resource, name, None)
            if which is not None and value:
                soft, hard = resource.getrlimit(which)
                value = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(which, (value, value))
    except ImportError:
        pass
    nonce_fd, proof_fd, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    exec(compile(source, "program.py", "exec"), {{"__name__": "__main__"}})
    os.write(proof_fd, nonce)

main()
'''

# Where host daemons keep their Unix sockets (connecting to one needs no write access): the sandbox sees
# each as an empty read-only tmpfs (the harness's own directories inside put back).
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run")

# Runs as root of fresh user, mount, network and PID namespaces (`unshare`), before the runner, and mounts
# with mount(2) directly (some 30 mounts: a `mount` process for each would triple the time of a run): the
# working directory `box` stays writable, /dev is replaced by a few device nodes, the hidden directories by
# empty tmpfs (`root`, which holds the runner and `box`, put back where it was), every other mount becomes
# read-only, nosuid and nodev, and is checked to be; then `setpriv` drops every capability (so nothing can
# be remounted or unmounted) and executes the runner.
UNSHARE_SETUP = r'''
import ctypes, os, re, sys
root, box = sys.argv[1:3]
hidden = sys.argv[3:sys.argv.index("--")]
setpriv, *command = sys.argv[sys.argv.index("--") + 1:]
DEVICES = ("null", "zero", "full", "random", "urandom")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

def mount(source, target, fstype=None, flags=0, data=None):  # mount(2)
    args = [None if a is None else os.fsencode(a) for a in (source, target, fstype)]
    if libc.mount(*args, flags, None if data is None else data.encode()) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")

def tmpfs(path):
    os.makedirs(path, exist_ok=True)
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    return path

def mount_points():
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        points = (re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[1]) for line in f)
        return [point for point in dict.fromkeys(points) if os.path.exists(point)]  # the others are covered

mount(box, box, flags=MS_BIND)
dev = tmpfs(os.path.join(root, "dev"))
for name in DEVICES:
    open(os.path.join(dev, name), "w").close()
    mount("/dev/" + name, os.path.join(dev, name), flags=MS_BIND)
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
    os.symlink(target, os.path.join(dev, name))
mount(dev, "/dev", flags=MS_MOVE)
for directory in hidden:
    if not root.startswith(directory + "/"):
        tmpfs(directory)
    else:  # an empty tmpfs holding `root` (without its mounts) and `box` (writable) at their paths
        empty = tmpfs(os.path.join(root, "hidden"))
        inner = os.path.join(empty, os.path.relpath(root, directory))
        os.makedirs(inner)
        mount(root, inner, flags=MS_BIND)
        mount(box, os.path.join(inner, os.path.relpath(box, root)), flags=MS_BIND)
        mount(empty, directory, flags=MS_MOVE)
devices = {"/dev/" + name for name in DEVICES}
for point in mount_points():
    # a bind remount sets the flags of this one mount (the file system's stay); noexec stays as it was
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (os.statvfs(point).f_flag & MS_NOEXEC)
    flags |= 0 if point == box else MS_RDONLY
    flags |= 0 if point in devices else MS_NODEV
    try:
        mount(None, point, flags=flags)
    except OSError:  # a covered mount point's path may now be a plain directory
        pass
for point in mount_points():  # what is mounted where it can be reached
    flags = os.statvfs(point).f_flag
    if (point != box) != bool(flags & os.ST_RDONLY) or not flags & os.ST_NOSUID or (
            point not in devices and not flags & os.ST_NODEV):
        sys.exit(f"pass@k sandbox: could not make {point} read-only, nosuid and nodev (except the working directory "
                 "and device nodes)")
os.chdir(box)  # into the writable mount on top of it
os.execv(setpriv, [setpriv, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--", *command])
'''


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def load_problems(path: Optional[str | Path] = None) -> list[dict[str, str]]:
    """The problems of a HumanEval-format JSONL file (default: the shipped mini set)."""
    path = Path(path) if path is not None else MINI_PROBLEMS
    if not path.is_file():
        raise ValueError(f"problems file {path} does not exist")
    problems, seen = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            problem = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
        missing = [k for k in PROBLEM_KEYS if not isinstance(problem.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing or non-string field(s) {missing} (HumanEval format: {', '.join(PROBLEM_KEYS)})")
        if problem["task_id"] in seen:
            raise ValueError(f"{path}:{line_no}: task_id {problem['task_id']!r} appears twice")
        seen.add(problem["task_id"])
        problems.append(problem)
    if not problems:
        raise ValueError(f"problems file {path} holds no problems")
    return problems


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to the earliest stop sequence (all of it if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# ----------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k), as 1 - prod(1 - k/i), i = n-c+1..n."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (1 <= k <= n), got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------
# Running a completion
# ----------------------------------------------------------------------------------------------


def program_source(problem: dict[str, str], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class IsolationUnavailable(RuntimeError):
    """No way to run generated code under OS isolation here (and running it without was not asked for)."""


def _sandbox_env(home: str) -> dict[str, str]:
    # A fresh environment: nothing of the parent's (no proxies, no credentials, no PYTHON* settings).
    return {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*", "NO_PROXY": "*", "OMP_NUM_THREADS": "1"}


def _tool(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _isolated_command(isolation: str, root: Path, box: Path, command: list[str]) -> list[str]:
    """`command` wrapped to run under `isolation` with `box` as its only writable place."""
    if isolation == "none":
        return command
    hidden = [d for d in HIDDEN_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    if isolation == "bwrap":
        return [_tool("bwrap"), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--remount-ro", "/proc",
                *(arg for d in hidden for arg in ("--tmpfs", d)), "--ro-bind", str(root), str(root),
                "--bind", str(box), str(box), *(arg for d in hidden for arg in ("--remount-ro", d)),
                "--chdir", str(box), "--", *command]
    (root / "setup.py").write_text(UNSHARE_SETUP, encoding="utf-8")
    return [_tool("unshare"), "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount", "--mount-proc",
            "--kill-child", sys.executable, "-I", "-S", str(root / "setup.py"), str(root), str(box), *hidden, "--",
            _tool("setpriv"), *command]


def _run_program(source: str, timeout: float, memory_mb: int, isolation: str) -> dict[str, Any]:
    """Run `source` under `isolation`: ``{timed_out, code, proved, stderr, seconds}``; `proved` is whether the
    runner wrote back this run's token, i.e. whether the program's last statement returned."""
    limits = {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_FSIZE": 16 * 2**20,
              "RLIMIT_CORE": 0}
    nonce = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="kdlora-passk-") as work:
        root = Path(work).resolve()
        box = root / "box"  # the program's working directory, HOME and TMPDIR: its only writable place
        box.mkdir()
        (root / "program.py").write_text(source, encoding="utf-8")
        (root / "runner.py").write_text(RUNNER.format(limits=limits), encoding="utf-8")
        nonce_r, nonce_w = os.pipe()
        proof_r, proof_w = os.pipe()
        try:
            os.write(nonce_w, nonce)
            os.close(nonce_w)
            command = _isolated_command(isolation, root, box, [sys.executable, "-I", str(root / "runner.py"),
                                                                str(nonce_r), str(proof_w), str(root / "program.py")])
            start = time.perf_counter()
            with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
                proc = subprocess.Popen(command, cwd=box, env=_sandbox_env(str(box)), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, pass_fds=(nonce_r, proof_w), start_new_session=True)
                os.close(nonce_r)
                os.close(proof_w)
                nonce_r = proof_w = -1
                try:
                    code = proc.wait(timeout=timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    code = proc.wait()
            seconds = time.perf_counter() - start
            os.set_blocking(proof_r, False)  # a process left running (without isolation) may hold the pipe open
            try:
                proof = os.read(proof_r, 4096)
            except BlockingIOError:
                proof = b""
        finally:
            for fd in (nonce_r, proof_w, proof_r):
                if fd >= 0:
                    os.close(fd)
        stderr = (root / "stderr").read_text(encoding="utf-8", errors="replace").strip()
    return {"timed_out": timed_out, "code": code, "proved": proof == nonce, "stderr": stderr, "seconds": seconds}


@functools.lru_cache(maxsize=None)
def _isolation_problem(isolation: str) -> Optional[str]:
    """Why `isolation` cannot run a program here (None: it can), found by running one."""
    missing = [t for t in {"bwrap": ("bwrap",), "unshare": ("unshare", "setpriv")}[isolation] if not _tool(t)]
    if missing:
        return f"{', '.join(missing)} not installed"
    result = _run_program("pass\n", timeout=30, memory_mb=1024, isolation=isolation)
    if result["proved"] and result["code"] == 0:
        return None
    last = result["stderr"].splitlines()[-1] if result["stderr"] else f"exit status {result['code']}"
    return last[:DETAIL_CHARS]


def resolve_isolation(isolation: str = "auto") -> str:
    """The isolation generated code will run under: ``"bwrap"``, ``"unshare"`` or ``"none"``.

    ``"auto"`` takes the first of bwrap and unshare that works here; ``"none"`` must be asked for.
    Raises `IsolationUnavailable` (naming why each failed) when the asked-for isolation does not work.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "none":
        return "none"
    candidates = ISOLATIONS[1:3] if isolation == "auto" else (isolation,)
    problems = {}
    for candidate in candidates:
        problems[candidate] = _isolation_problem(candidate)
        if problems[candidate] is None:
            return candidate
    reasons = "; ".join(f"{k}: {v}" for k, v in problems.items())
    raise IsolationUnavailable(f"no OS isolation for generated code here ({reasons}); install bubblewrap or enable "
                               "unprivileged user namespaces, or pass --no-isolation (in Python: isolation='none') to "
                               "run it without isolation")


class CodeExecutionNotAllowed(ValueError):
    """Generated code was about to run without ``allow_code_execution``."""


def _require_allowed(allow_code_execution: bool) -> None:
    if not allow_code_execution:
        raise CodeExecutionNotAllowed("pass@k runs model-generated code: allow it explicitly with --allow-code-execution "
                                      "(in Python: allow_code_execution=True)")


def run_completion(problem: dict[str, str], completion: str, timeout: float = 5.0, memory_mb: int = 1024,
                   isolation: str = "auto", allow_code_execution: bool = False) -> dict[str, Any]:
    """Run one completion against the problem's tests in an isolated child process (see the module docstring).

    Returns ``{"passed": bool, "status": "passed" | "failed" | "timed out", "detail": str, "seconds": float}``;
    `detail` is the last line of the child's stderr (the exception) or why it was stopped. Passed means
    ``check(entry_point)`` returned (the run's token came back) and the process exited with status 0.
    """
    _require_allowed(allow_code_execution)
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    result = _run_program(program_source(problem, completion), timeout, memory_mb, resolve_isolation(isolation))
    seconds = result["seconds"]
    if result["timed_out"]:
        return {"passed": False, "status": "timed out", "detail": f"killed after {timeout:g} s", "seconds": seconds}
    code, stderr = result["code"], result["stderr"]
    if code == 0 and result["proved"]:
        return {"passed": True, "status": "passed", "detail": "", "seconds": seconds}
    if code == 0:
        last = "exited with status 0 before check() returned"
    else:
        last = stderr.splitlines()[-1] if stderr else (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
    return {"passed": False, "status": "failed", "detail": last[:DETAIL_CHARS], "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# Generating and evaluating
# ----------------------------------------------------------------------------------------------


def generate_completions(model, tokenizer, problems: Sequence[dict[str, str]], n: int = 1, temperature: float = 0.8,
                         max_new_tokens: int = 256, stop: Sequence[str] = STOP_SEQUENCES, top_p: float = 0.95,
                         batch_size: Optional[int] = None, seed: int = 0) -> dict[str, list[str]]:
    """`n` sampled completions of each problem's prompt (task_id -> list), each cut at the first stop sequence.

    ``temperature == 0`` is greedy decoding and needs ``n == 1``. Sampling is seeded (`seed`) inside a
    forked RNG, so the caller's random state is left as it was. `batch_size` samples are drawn per
    `generate` call (default: all n at once).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and n > 1:
        raise ValueError(f"temperature 0 (greedy) gives {n} identical samples; use n=1 or a temperature > 0")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    class StopOnSequences(StoppingCriteria):
        def __init__(self, prompt_len: int) -> None:
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], dtype=torch.bool, device=input_ids.device)

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    device = next(model.parameters()).device
    completions: dict[str, list[str]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), torch.no_grad():
            torch.manual_seed(seed)
            for problem in problems:
                enc = tokenizer(problem["prompt"], return_tensors="pt").to(device)
                prompt_len = enc["input_ids"].shape[1]
                samples: list[str] = []
                while len(samples) < n:
                    count = min(n - len(samples), batch_size or n)
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=count, pad_token_id=pad,
                                         stopping_criteria=StoppingCriteriaList([StopOnSequences(prompt_len)]), **sampling)
                    texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                    samples += [truncate_at_stop(t, stop) for t in texts]
                completions[problem["task_id"]] = samples
    finally:
        model.train(was_training)
    return completions


def evaluate(problems: Sequence[dict[str, str]], completions: dict[str, list[str]], ks: Iterable[int] = (1,),
             timeout: float = 5.0, memory_mb: int = 1024, workers: int = 1, isolation: str = "auto",
             allow_code_execution: bool = False) -> dict[str, Any]:
    """Run every completion (`run_completion`) and score pass@k.

    Returns ``{"pass@k": {"pass@1": mean over problems, ...}, "problems": [{task_id, n, correct,
    "pass@1", ..., "samples": [{completion, passed, status, detail, seconds}]}], "timeout": ...,
    "isolation": the isolation used}``.
    """
    _require_allowed(allow_code_execution)
    ks = sorted(set(int(k) for k in ks))
    if not ks:
        raise ValueError("ks is empty: give at least one k")
    missing = [p["task_id"] for p in problems if not completions.get(p["task_id"])]
    if missing:
        raise ValueError(f"no completions for {len(missing)} problem(s), first {missing[0]!r}")
    smallest = min(len(completions[p["task_id"]]) for p in problems)
    if ks[-1] > smallest:
        raise ValueError(f"pass@{ks[-1]} needs at least {ks[-1]} completions per problem, some have {smallest}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    isolation = resolve_isolation(isolation)
    jobs = [(p, c) for p in problems for c in completions[p["task_id"]]]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each job is a child process: threads suffice
        results = list(pool.map(lambda job: run_completion(job[0], job[1], timeout, memory_mb, isolation,
                                                           allow_code_execution=True), jobs))
    rows, at = [], 0
    for p in problems:
        samples = completions[p["task_id"]]
        outcome = results[at:at + len(samples)]
        at += len(samples)
        correct = sum(r["passed"] for r in outcome)
        row = {"task_id": p["task_id"], "n": len(samples), "correct": correct}
        row.update({f"pass@{k}": pass_at_k(len(samples), correct, k) for k in ks})
        row["samples"] = [{"completion": c, **r} for c, r in zip(samples, outcome)]
        rows.append(row)
    means = {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in rows])) for k in ks}
    return {"pass@k": means, "problems": rows, "timeout": timeout, "memory_mb": memory_mb, "isolation": isolation}


def results_markdown(result: dict[str, Any], title: str) -> str:
    keys = list(result["pass@k"])
    lines = [f"# {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
             "| " + " | ".join(f"{result['pass@k'][k]:.3f}" for k in keys) + " |", "",
             "| task | n | correct | " + " | ".join(keys) + " | first failure |", "|---|---|---|" + "---|" * len(keys) + "---|"]
    for row in result["problems"]:
        failure = next((f"{s['status']}: {s['detail']}" for s in row["samples"] if not s["passed"]), "")
        failure = failure.replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {row['task_id']} | {row['n']} | {row['correct']} | "
                     + " | ".join(f"{row[k]:.3f}" for k in keys) + f" | {failure} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, result: dict[str, Any], title: str) -> None:
    """``results.json`` and ``results.md`` in a new `out_dir`, which must not exist: both files are
    written into a temporary sibling that is then renamed to `out_dir`, so it appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"--out {out_dir} already exists; pass@k results are never written over, choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_atomic(tmp / "results.json", json.dumps(result, indent=2) + "\n")
        write_atomic(tmp / "results.md", results_markdown(result, title))
        os.chmod(tmp, 0o777 & ~_umask())
        if out_dir.exists():  # appeared while we were evaluating
            raise FileExistsError(f"--out {out_dir} appeared during the run; results are in {tmp}")
        os.rename(tmp, out_dir)
    except FileExistsError:
        raise
    except BaseException:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlora.eval.passk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face causal-LM directory (model + tokenizer)")
    parser.add_argument("--problems", default=None, help="HumanEval-format JSONL (default: the shipped mini set)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem")
    parser.add_argument("--k", type=int, action="append", default=None, help="k of pass@k (repeatable; default 1)")
    parser.add_argument("--out", required=True, help="new directory for results.json and results.md")
    parser.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) for n=1, else 0.8")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per completion")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of each completion's process")
    parser.add_argument("--workers", type=int, default=1, help="completions run at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device for generation (default: cuda if available, else cpu)")
    parser.add_argument("--max-problems", type=int, default=None, help="the first N problems only")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="run the model-generated code (required: evaluating pass@k executes it)")
    parser.add_argument("--no-isolation", action="store_true",
                        help="run it without OS isolation (for machines where neither bwrap nor unshare works: "
                             "the code can then read, write, delete and connect to anything you can)")
    args = parser.parse_args(argv)
    ks = sorted(set(args.k or [1]))
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    out = Path(args.out)
    try:
        _require_allowed(args.allow_code_execution)
        if out.exists():
            raise ValueError(f"--out {out} already exists; pass@k results are never written over, choose a new directory")
        if ks[0] < 1 or ks[-1] > args.n:
            raise ValueError(f"every --k must be in [1, --n={args.n}], got {ks}")
        if not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model} is not a directory")
        problems = load_problems(args.problems)
        if args.max_problems is not None:
            problems = problems[:args.max_problems]
        isolation = "none" if args.no_isolation else resolve_isolation("auto")  # before the long generation
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
        completions = generate_completions(model, tokenizer, problems, n=args.n, temperature=temperature,
                                           max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed)
        generated = time.perf_counter() - start
        result = evaluate(problems, completions, ks, timeout=args.timeout, memory_mb=args.memory_mb, workers=args.workers,
                          isolation=isolation, allow_code_execution=True)
        result.update({"model": args.model, "problems_file": args.problems or "kdlora/assets/humaneval_mini.jsonl", "n": args.n,
                       "temperature": temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                       "seed": args.seed, "device": device, "generation_seconds": round(generated, 2)})
        write_results(out, result, f"pass@k of {Path(args.model).name} ({len(problems)} problems, n={args.n}, T={temperature:g})")
    except (ValueError, FileExistsError, IsolationUnavailable) as e:
        print(f"kdlora.eval.passk: error: {e}", file=sys.stderr)
        return 2
    print(results_markdown(result, "pass@k"))
    print(f"[kdlora] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
