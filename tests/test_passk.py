"""pass@k: hand-written completions run in the sandbox (right, wrong, raising, looping, memory-hungry),
attacks on the harness (exiting before check(), forging the proof, deleting or writing files outside,
connecting to 127.0.0.1, leaving processes behind), the estimator against hand computations, stop
sequences, and generate + evaluate + the CLI on a tiny random Llama (which scores ~0: the plumbing is
what is checked)."""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_bpe_tokenizer
from kdlora.eval import passk
from kdlora.eval.passk import evaluate, generate_completions, load_problems, pass_at_k, truncate_at_stop

PROBLEM = {
    "task_id": "t/0", "entry_point": "double",
    "prompt": 'def double(x):\n    """Twice x."""\n',
    "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
}

# The OS isolations that work on this machine; the plumbing tests run under the first (or none at all).
ISOLATION_PROBLEMS = {kind: passk._isolation_problem(kind) for kind in ("bwrap", "unshare")}
ISOLATED = [kind for kind, problem in ISOLATION_PROBLEMS.items() if problem is None]
RUN_ISOLATION = ISOLATED[0] if ISOLATED else "none"
each_isolation = pytest.mark.parametrize("isolation", ISOLATED or [pytest.param("none", marks=pytest.mark.skip(
    reason="no OS isolation on this machine: " + "; ".join(f"{k}: {v}" for k, v in ISOLATION_PROBLEMS.items())))])
run_completion = functools.partial(passk.run_completion, isolation=RUN_ISOLATION, allow_code_execution=True)


def test_shipped_problems_are_humaneval_format_and_solvable():
    problems = load_problems()
    assert len(problems) >= 5 and len({p["task_id"] for p in problems}) == len(problems)
    for p in problems:
        result = run_completion(p, p["canonical_solution"])
        assert result["passed"], (p["task_id"], result)
        assert not run_completion(p, "    return None\n")["passed"]


@pytest.mark.parametrize("completion, status, detail", [
    ("    return 2 * x\n", "passed", ""),
    ("    return x + 2\n", "failed", "AssertionError"),  # right for 2, wrong for -3
    ("    raise RuntimeError('no')\n", "failed", "RuntimeError: no"),
    ("    return 2 * x\n  bad indent\n", "failed", "IndentationError"),
    ("    b = bytearray(4 * 2**30)\n    return 2 * x\n", "failed", "MemoryError"),
])
def test_completion_outcomes(completion, status, detail):
    result = run_completion(PROBLEM, completion, timeout=10)
    assert result["status"] == status and result["passed"] == (status == "passed")
    assert detail in result["detail"]


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    result = run_completion(PROBLEM, "    while True:\n        pass\n", timeout=1.5)
    elapsed = time.perf_counter() - start
    assert result == {**result, "passed": False, "status": "timed out"}
    assert 1.5 <= elapsed < 6


def test_completion_runs_in_its_own_directory_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.chdir(tmp_path)
    probe = ("    import os, sys\n    assert 'HTTPS_PROXY' not in os.environ, 'proxy leaked'\n"
             "    assert os.getcwd() != %r, 'ran in the caller directory'\n"
             "    open('scratch.txt', 'w').write('x')\n    return 2 * x\n") % str(tmp_path)
    assert run_completion(PROBLEM, probe)["passed"]
    assert list(tmp_path.iterdir()) == []  # the scratch file went to the child's temporary directory


@pytest.fixture(params=["tmp", "checkout"])
def victim(request, tmp_path):
    """A file outside the sandbox's directory: in the temporary directory (which the sandbox sees empty)
    or beside this test (which it sees read-only)."""
    directory = tmp_path if request.param == "tmp" else Path(tempfile.mkdtemp(prefix=".victim-", dir=Path(__file__).parent))
    victim = directory / "victim.txt"
    victim.write_text("precious\n")
    yield victim
    if request.param == "checkout":
        shutil.rmtree(directory)


def _out_of_sight(path: Path) -> bool:
    return any(path.resolve().is_relative_to(d) for d in passk.HIDDEN_DIRS if Path(d).is_dir() and not Path(d).is_symlink())


@pytest.mark.parametrize("isolation", sorted({RUN_ISOLATION, "none"}))
@pytest.mark.parametrize("ending", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "print('passed')\nimport os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n    except OSError:\n"
    "        pass\nos._exit(0)\n",
    # replays whatever any open descriptor yields (the token's pipe is closed before the program runs)
    "import os\ndata = b''\nfor fd in range(3, 64):\n    try:\n        os.set_blocking(fd, False)\n        data += os.read(fd, 64)\n"
    "    except OSError:\n        pass\nfor fd in range(3, 64):\n    try:\n        os.write(fd, data)\n    except OSError:\n"
    "        pass\nos._exit(0)\n",
], ids=["sys.exit", "os._exit", "print-and-write-fds", "replay-fds"])
def test_exiting_before_check_returns_fails(ending, isolation):
    # A wrong function, then a top-level exit with status 0 before the tests define and run check().
    result = run_completion(PROBLEM, "    return 0\n" + ending, isolation=isolation)
    assert result["status"] == "failed" and not result["passed"]
    assert result["detail"] == "exited with status 0 before check() returned"


@each_isolation
@pytest.mark.parametrize("attack", [
    "    import posix\n    posix.unlink({victim!r})\n",
    "    open({victim!r}, 'w').write('overwritten')\n",
    "    import importlib, os\n    importlib.reload(os)\n    os.remove({victim!r})\n",
    # root of its user namespace tries to make the mounts writable again, then writes
    "    try:\n        import subprocess\n        for line in open('/proc/self/mounts'):\n"
    "            subprocess.run(['mount', '-o', 'remount,bind,rw', line.split()[1]], capture_output=True)\n"
    "    except Exception:\n        pass\n    open({victim!r}, 'a').write('appended')\n",
], ids=["posix.unlink", "open-w", "reload-os-remove", "remount-rw"])
def test_files_outside_the_sandbox_are_read_only(attack, isolation, victim):
    result = run_completion(PROBLEM, attack.format(victim=str(victim)) + "    return 2 * x\n", isolation=isolation)
    assert result["status"] == "failed"
    assert ("No such file or directory" if _out_of_sight(victim) else "Read-only file system") in result["detail"]
    assert victim.read_text() == "precious\n"


@each_isolation
def test_host_kernel_settings_are_read_only(isolation):
    # writes the value back unchanged: harmless even where it got through (as it does for root without isolation)
    completion = ("    value = open('/proc/sys/vm/swappiness').read()\n"
                  "    open('/proc/sys/vm/swappiness', 'w').write(value)\n    return 2 * x\n")
    result = run_completion(PROBLEM, completion, isolation=isolation)
    assert result["status"] == "failed" and "Read-only file system" in result["detail"]


@each_isolation
@pytest.mark.parametrize("connect", [
    "    import _socket\n    s = _socket.socket.__mro__[-2](_socket.AF_INET, _socket.SOCK_STREAM)\n"
    "    s.connect(('127.0.0.1', {port}))\n    s.sendall(b'leak')\n",
    "    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n",
], ids=["_socket", "socket"])
def test_no_network_not_even_loopback(connect, isolation):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_completion(PROBLEM, connect.format(port=port) + "    return 2 * x\n", isolation=isolation)
        # unshare leaves the namespace's loopback down, bwrap brings up one of its own with nothing listening
        assert result["status"] == "failed" and result["detail"] in (
            "OSError: [Errno 101] Network is unreachable", "ConnectionRefusedError: [Errno 111] Connection refused")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection is waiting
            server.accept()


@each_isolation
def test_host_unix_sockets_in_tmp_are_out_of_reach(isolation):
    directory = Path(tempfile.mkdtemp(dir="/tmp"))  # where daemons (tmux, ssh-agent, X) keep their sockets
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(directory / "daemon.sock"))
            server.listen()
            completion = ("    import _socket\n    s = _socket.socket.__mro__[-2](_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                          f"    s.connect({str(directory / 'daemon.sock')!r})\n    return 2 * x\n")
            result = run_completion(PROBLEM, completion, isolation=isolation)
            assert result["status"] == "failed" and result["detail"].startswith("FileNotFoundError")
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        shutil.rmtree(directory)


def _processes_with_argv(argv: list[str]) -> list[int]:
    wanted, found = ("\0".join(argv) + "\0").encode(), []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@each_isolation
@pytest.mark.parametrize("then, status", [("    time.sleep(60)\n", "timed out"), ("", "passed")])
def test_no_process_outlives_the_program(then, status, isolation):
    # A child leaves the session (setsid) and sleeps for a day under an argv unique to this run.
    argv = ["sleep", f"{86400 + secrets.randbelow(10**6) / 10**6:.6f}"]
    completion = (f"    import posix, time\n    if posix.fork() == 0:\n        posix.setsid()\n"
                  f"        posix.execv({shutil.which('sleep')!r}, {argv!r})\n    time.sleep(0.3)\n{then}    return 2 * x\n")
    result = run_completion(PROBLEM, completion, timeout=2, isolation=isolation)
    assert result["status"] == status
    deadline, survivors = time.monotonic() + 2, _processes_with_argv(argv)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.05)
        survivors = _processes_with_argv(argv)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


@each_isolation
def test_ordinary_programs_work_in_the_sandbox(isolation):
    # Files in its own directory and TMPDIR, child processes, its own /proc with only its processes; no privileges.
    completion = ("    import os, subprocess, sys, tempfile\n"
                  "    open('scratch.txt', 'w').write('x')\n    tempfile.NamedTemporaryFile().write(b'x')\n"
                  "    out = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout\n"
                  "    assert out == '42\\n', out\n"
                  "    assert len([p for p in os.listdir('/proc') if p.isdigit()]) < 5\n"
                  "    status = open('/proc/self/status').read()\n"
                  "    assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status, status\n"
                  "    return 2 * x\n")
    result = run_completion(PROBLEM, completion, isolation=isolation)
    assert result["passed"], result


def test_running_code_needs_permission_and_a_known_isolation():
    with pytest.raises(passk.CodeExecutionNotAllowed, match="--allow-code-execution"):
        passk.run_completion(PROBLEM, "    return 2 * x\n")
    with pytest.raises(passk.CodeExecutionNotAllowed, match="allow_code_execution=True"):
        evaluate([PROBLEM], {"t/0": ["    return 2 * x\n"]})
    with pytest.raises(ValueError, match="isolation must be one of"):
        run_completion(PROBLEM, "    return 2 * x\n", isolation="docker")


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k: every 2-subset holds a correct sample
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-9)
    for n, c, k, message in ((5, 6, 1, "0 <= c <= n"), (5, 2, 0, "1 <= k <= n"), (3, 1, 4, "at least 4 samples")):
        with pytest.raises(ValueError, match=message):
            pass_at_k(n, c, k)


def test_stop_sequences_cut_at_the_earliest():
    body = "    return x\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nprint(double(2))\nclass A:\n") == body
    assert truncate_at_stop(body + "\n\nif __name__ == '__main__':\n    main()") == body + "\n"
    assert truncate_at_stop(body) == body
    assert truncate_at_stop("    y = 1  # definitely\n    return y\n") == "    y = 1  # definitely\n    return y\n"


def test_evaluate_counts_and_means():
    completions = {"t/0": ["    return 2 * x\n", "    return x\n", "    return x + x\n", "    while True: pass\n"]}
    result = evaluate([PROBLEM], completions, ks=(1, 2), timeout=1.0, isolation=RUN_ISOLATION, allow_code_execution=True)
    row = result["problems"][0]
    assert (row["n"], row["correct"]) == (4, 2)
    assert [s["status"] for s in row["samples"]] == ["passed", "failed", "passed", "timed out"]
    assert row["pass@1"] == pytest.approx(0.5) and row["pass@2"] == pytest.approx(1 - 1 / 6)
    assert result["pass@k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(5 / 6)}
    assert result["isolation"] == RUN_ISOLATION
    with pytest.raises(ValueError, match="pass@5 needs at least 5 completions"):
        evaluate([PROBLEM], completions, ks=(5,), allow_code_execution=True)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    texts = [p["prompt"] + p["canonical_solution"] for p in load_problems()]
    write_tiny_bpe_tokenizer(directory, texts, vocab_size=320)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_generate_and_evaluate_on_a_tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    problems = load_problems()[:2]
    state = torch.random.get_rng_state()
    completions = generate_completions(model, tok, problems, n=3, temperature=1.0, max_new_tokens=12, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert set(completions) == {p["task_id"] for p in problems} and all(len(v) == 3 for v in completions.values())
    assert all(truncate_at_stop(c) == c for v in completions.values() for c in v)
    again = generate_completions(model, tok, problems, n=3, temperature=1.0, max_new_tokens=12, seed=1)
    assert again == completions  # seeded
    greedy = generate_completions(model, tok, problems[:1], n=1, temperature=0.0, max_new_tokens=6)
    assert len(greedy["mini/0"]) == 1
    with pytest.raises(ValueError, match="temperature 0 \\(greedy\\) gives 3 identical samples"):
        generate_completions(model, tok, problems, n=3, temperature=0.0)
    result = evaluate(problems, completions, ks=(1, 3), timeout=3, isolation=RUN_ISOLATION, allow_code_execution=True)
    assert [r["n"] for r in result["problems"]] == [3, 3]
    assert all(len(r["samples"]) == 3 and 0 <= r["correct"] <= 3 for r in result["problems"])
    for k in (1, 3):
        assert result["pass@k"][f"pass@{k}"] == pytest.approx(sum(r[f"pass@{k}"] for r in result["problems"]) / 2)


def test_cli_writes_results_once_and_refuses_to_overwrite(tiny_llama_dir, tmp_path, capsys):
    problems = tmp_path / "two.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in load_problems()[:2]))
    out = tmp_path / "results" / "tiny"
    args = ["--model", str(tiny_llama_dir), "--problems", str(problems), "--n", "2", "--k", "1", "--k", "2",
            "--max-new-tokens", "8", "--timeout", "3", "--allow-code-execution",
            *(["--no-isolation"] if RUN_ISOLATION == "none" else []), "--out", str(out)]
    assert passk.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary left beside it
    data = json.loads((out / "results.json").read_text())
    assert set(data["pass@k"]) == {"pass@1", "pass@2"} and data["n"] == 2 and data["temperature"] == 0.8
    assert data["isolation"] == RUN_ISOLATION
    assert [r["task_id"] for r in data["problems"]] == ["mini/0", "mini/1"]
    assert "| mini/1 | 2 |" in (out / "results.md").read_text()
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert passk.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlora.eval.passk: error: --out") and "already exists" in err and "\n" not in err
    assert (out / "results.json").read_text() == before
    assert passk.main([*args[:-1], str(tmp_path / "other"), "--k", "3"]) == 2
    assert "every --k must be in [1, --n=2]" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    assert passk.main([*args[:-1], str(tmp_path / "other"), "--problems", str(bad)]) == 2
    assert "missing or non-string field(s) ['test', 'entry_point']" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_cli_runs_code_only_when_allowed_and_isolated(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama_dir), "--max-problems", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert passk.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlora.eval.passk: error: pass@k runs model-generated code") and "--allow-code-execution" in err
    # A machine where neither isolation works: refused, unless running without isolation is asked for.
    monkeypatch.setattr(passk, "_isolation_problem", lambda kind: "not installed")
    assert passk.main([*args, "--allow-code-execution"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kdlora.eval.passk: error: no OS isolation for generated code here (bwrap: not installed; unshare: not "
                   "installed); install bubblewrap or enable unprivileged user namespaces, or pass --no-isolation "
                   "(in Python: isolation='none') to run it without isolation")
    assert not out.exists()
    assert passk.main([*args, "--allow-code-execution", "--no-isolation"]) == 0
    assert json.loads((out / "results.json").read_text())["isolation"] == "none"
