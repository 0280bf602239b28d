"""pass@k of a causal LM on HumanEval-style problems: sample completions, run each against its tests.

A problem is one JSONL line in HumanEval's format: ``task_id``, ``prompt`` (a signature and docstring),
``test`` (source defining ``check(candidate)``) and ``entry_point`` (the function's name). The package
ships six small hand-written ones (``kdlora/assets/humaneval_mini.jsonl``) to check the plumbing.

A completion runs as ``prompt + completion + test + check(entry_point)`` in its own process
(``sys.executable -I``, a fresh temporary directory as working directory and HOME, an environment
without proxies), killed with its process group after `timeout` seconds. Inside, before the program:
memory, CPU time and file size are limited (``resource``, POSIX), sockets cannot be created, and
process spawning and file removal functions raise. This is a guard against accidents of generated
code, not a security boundary against hostile code (that needs a container).

pass@k is the unbiased estimator of the Codex paper (Chen et al. 2021):
``1 - C(n-c, k) / C(n, k)`` for n samples of which c pass, computed as a stable product.

    python -m kdlora.passk --model DIR [--problems FILE] --n 10 --k 1 --k 10 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from kdlora.callbacks import write_atomic

MINI_PROBLEMS = Path(__file__).parent / "assets" / "humaneval_mini.jsonl"
# Where a function-level completion ends (Codex's stop sequences, written to start a new top-level statement).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
DETAIL_CHARS = 300

# Runs in the child before the program: limits, no network, no spawning or deleting.
SANDBOX_PREAMBLE = r'''
import sys
_limits = {limits!r}
try:
    import resource
    for _name, _value in _limits.items():
        _which = getattr(resource, _name, None)
        if _which is not None and _value:
            _soft, _hard = resource.getrlimit(_which)
            _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
            resource.setrlimit(_which, (_value, _value))
except ImportError:
    pass

def _denied(what):
    def deny(*args, **kwargs):
        raise PermissionError(what + " is disabled in the pass@k sandbox")
    return deny

import socket as _socket_module, _socket
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the pass@k sandbox")
_socket.socket = _socket_module.socket = _socket_module.SocketType = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    setattr(_socket_module, _name, _denied("socket." + _name))

import os, shutil, subprocess
for _name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
              "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "unlink",
              "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "putenv", "unsetenv"):
    if hasattr(os, _name):
        setattr(os, _name, _denied("os." + _name))
shutil.rmtree, shutil.move, shutil.chown = _denied("shutil.rmtree"), _denied("shutil.move"), _denied("shutil.chown")
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _denied("subprocess")

with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
del _f, _name, _limits
exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
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


def _sandbox_env(home: str) -> dict[str, str]:
    # A fresh environment: nothing of the parent's (no proxies, no credentials, no PYTHON* settings).
    return {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*", "NO_PROXY": "*", "OMP_NUM_THREADS": "1"}


def run_completion(problem: dict[str, str], completion: str, timeout: float = 5.0, memory_mb: int = 1024) -> dict[str, Any]:
    """Run one completion against the problem's tests in a sandboxed child process.

    Returns ``{"passed": bool, "status": "passed" | "failed" | "timed out", "detail": str, "seconds": float}``;
    `detail` is the last line of the child's stderr (the exception) or why it was stopped.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    limits = {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_FSIZE": 16 * 2**20,
              "RLIMIT_CORE": 0}
    posix = os.name == "posix"
    with tempfile.TemporaryDirectory(prefix="kdlora-passk-") as work:
        Path(work, "program.py").write_text(program_source(problem, completion), encoding="utf-8")
        Path(work, "sandbox.py").write_text(SANDBOX_PREAMBLE.format(limits=limits), encoding="utf-8")
        start = time.perf_counter()
        with open(Path(work, "stdout"), "wb") as out, open(Path(work, "stderr"), "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "sandbox.py"], cwd=work, env=_sandbox_env(work),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    **({"start_new_session": True} if posix else {}))
            try:
                code = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL) if posix else proc.kill()
                except ProcessLookupError:
                    pass
                code = proc.wait()
        seconds = time.perf_counter() - start
        stderr = Path(work, "stderr").read_text(encoding="utf-8", errors="replace").strip()
    if timed_out:
        return {"passed": False, "status": "timed out", "detail": f"killed after {timeout:g} s", "seconds": seconds}
    if code == 0:
        return {"passed": True, "status": "passed", "detail": "", "seconds": seconds}
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
             timeout: float = 5.0, memory_mb: int = 1024, workers: int = 1) -> dict[str, Any]:
    """Run every completion and score pass@k.

    Returns ``{"pass@k": {"pass@1": mean over problems, ...}, "problems": [{task_id, n, correct,
    "pass@1", ..., "samples": [{completion, passed, status, detail, seconds}]}], "timeout": ...}``.
    """
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
    jobs = [(p, c) for p in problems for c in completions[p["task_id"]]]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each job is a child process: threads suffice
        results = list(pool.map(lambda job: run_completion(job[0], job[1], timeout, memory_mb), jobs))
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
    return {"pass@k": means, "problems": rows, "timeout": timeout, "memory_mb": memory_mb}


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
    parser = argparse.ArgumentParser(prog="python -m kdlora.passk", description=__doc__.split("\n\n")[0])
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
    args = parser.parse_args(argv)
    ks = sorted(set(args.k or [1]))
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    out = Path(args.out)
    try:
        if out.exists():
            raise ValueError(f"--out {out} already exists; pass@k results are never written over, choose a new directory")
        if ks[0] < 1 or ks[-1] > args.n:
            raise ValueError(f"every --k must be in [1, --n={args.n}], got {ks}")
        if not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model} is not a directory")
        problems = load_problems(args.problems)
        if args.max_problems is not None:
            problems = problems[:args.max_problems]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
        completions = generate_completions(model, tokenizer, problems, n=args.n, temperature=temperature,
                                           max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed)
        generated = time.perf_counter() - start
        result = evaluate(problems, completions, ks, timeout=args.timeout, memory_mb=args.memory_mb, workers=args.workers)
        result.update({"model": args.model, "problems_file": args.problems or "kdlora/assets/humaneval_mini.jsonl", "n": args.n,
                       "temperature": temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                       "seed": args.seed, "device": device, "generation_seconds": round(generated, 2)})
        write_results(out, result, f"pass@k of {Path(args.model).name} ({len(problems)} problems, n={args.n}, T={temperature:g})")
    except (ValueError, FileExistsError) as e:
        print(f"kdlora.passk: error: {e}", file=sys.stderr)
        return 2
    print(results_markdown(result, "pass@k"))
    print(f"[kdlora] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
