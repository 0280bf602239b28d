"""pass@k: hand-written completions run in the sandbox (right, wrong, raising, looping, networking,
memory-hungry, deleting), the estimator against hand computations, stop sequences, and generate +
evaluate + the CLI on a tiny random Llama (which scores ~0: the plumbing is what is checked)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_bpe_tokenizer
from kdlora import passk
from kdlora.passk import evaluate, generate_completions, load_problems, pass_at_k, run_completion, truncate_at_stop

PROBLEM = {
    "task_id": "t/0", "entry_point": "double",
    "prompt": 'def double(x):\n    """Twice x."""\n',
    "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
}


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
    ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return 2 * x\n", "failed", "PermissionError"),
    ("    import socket\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n    return 2 * x\n", "failed",
     "network access is disabled"),
    ("    import _socket\n    _socket.socket()\n    return 2 * x\n", "failed", "network access is disabled"),
    ("    b = bytearray(4 * 2**30)\n    return 2 * x\n", "failed", "MemoryError"),
    ("    import os\n    os.system('true')\n    return 2 * x\n", "failed", "os.system is disabled"),
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
    result = evaluate([PROBLEM], completions, ks=(1, 2), timeout=1.0)
    row = result["problems"][0]
    assert (row["n"], row["correct"]) == (4, 2)
    assert [s["status"] for s in row["samples"]] == ["passed", "failed", "passed", "timed out"]
    assert row["pass@1"] == pytest.approx(0.5) and row["pass@2"] == pytest.approx(1 - 1 / 6)
    assert result["pass@k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(5 / 6)}
    with pytest.raises(ValueError, match="pass@5 needs at least 5 completions"):
        evaluate([PROBLEM], completions, ks=(5,))


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
    result = evaluate(problems, completions, ks=(1, 3), timeout=3)
    assert [r["n"] for r in result["problems"]] == [3, 3]
    assert all(len(r["samples"]) == 3 and 0 <= r["correct"] <= 3 for r in result["problems"])
    for k in (1, 3):
        assert result["pass@k"][f"pass@{k}"] == pytest.approx(sum(r[f"pass@{k}"] for r in result["problems"]) / 2)


def test_cli_writes_results_once_and_refuses_to_overwrite(tiny_llama_dir, tmp_path, capsys):
    problems = tmp_path / "two.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in load_problems()[:2]))
    out = tmp_path / "results" / "tiny"
    args = ["--model", str(tiny_llama_dir), "--problems", str(problems), "--n", "2", "--k", "1", "--k", "2",
            "--max-new-tokens", "8", "--timeout", "3", "--out", str(out)]
    assert passk.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary left beside it
    data = json.loads((out / "results.json").read_text())
    assert set(data["pass@k"]) == {"pass@1", "pass@2"} and data["n"] == 2 and data["temperature"] == 0.8
    assert [r["task_id"] for r in data["problems"]] == ["mini/0", "mini/1"]
    assert "| mini/1 | 2 |" in (out / "results.md").read_text()
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert passk.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlora.passk: error: --out") and "already exists" in err and "\n" not in err
    assert (out / "results.json").read_text() == before
    assert passk.main([*args[:-1], str(tmp_path / "other"), "--k", "3"]) == 2
    assert "every --k must be in [1, --n=2]" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    assert passk.main([*args[:-1], str(tmp_path / "other"), "--problems", str(bad)]) == 2
    assert "missing or non-string field(s) ['test', 'entry_point']" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
