"""The repository itself: a fresh clone must work on any machine, so git tracks nothing that points
outside the tree (symbolic links) and no file names a path of the machine it was written on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Absolute paths that only exist on some machine: this checkout's own location, the user's home,
# and the roots of the project's machines and of typical workstations.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|mnt|data|scratch)/[\w.-]+")


def machine_paths(text: str, own_paths: list[str]) -> list[str]:
    """Absolute machine paths in `text`: matches of MACHINE_PATH and any of `own_paths` (as a directory)."""
    found = MACHINE_PATH.findall(text)
    found += [p for p in own_paths if p.strip("/") and p.rstrip("/") + "/" in text]
    return found


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return _git("ls-files", "-z").split("\0")[:-1]


def test_machine_path_detector():
    own = ["/tmp/tmp.abc/checkout"]
    assert machine_paths("--model /work/models/minilm", own) == ["/work/models"]
    assert machine_paths("see /home/ann/runs and /tmp/tmp.abc/checkout/x", own) == ["/home/ann", "/tmp/tmp.abc/checkout"]
    assert machine_paths("runs/demo/export, ./work/x, models/minilm, http://a.b/work/x", own) == []


def test_git_tracks_no_symbolic_links(tracked):
    links = [line.split("\t", 1)[1] for line in _git("ls-files", "-s").splitlines() if line.startswith("120000 ")]
    assert not links, f"tracked symbolic links (they point outside a fresh clone): {links}"


def test_no_tracked_file_names_a_path_of_this_machine(tracked):
    own = [str(REPO), str(REPO.parent), str(Path.home())]
    offenders = {}
    for name in tracked:
        path = REPO / name
        if name == "tests/test_repository.py" or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        found = machine_paths(text, own)
        if found:
            offenders[name] = sorted(set(found))[:3]
    assert not offenders, f"machine paths in tracked files: {offenders}"


# A markdown link or image: [text](target) / ![alt](target); the target ends at whitespace or ")".
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOCUMENTATION = ["README.md", "docs/*.md"]
README_MAX_LINES = 160


def broken_links(markdown: Path) -> list[str]:
    """Relative link targets in `markdown` that name no file or folder (a `#fragment` is ignored; URLs and
    in-page anchors are not checked)."""
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (markdown.parent / path).exists():
            broken.append(target)
    return broken


def test_broken_link_detector(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[a](a.md) [a, section](a.md#top) [up](../docs/a.md) ![fig](missing.png) [gone](c.md#x)\n"
                    "[web](https://example.org/x.md) [here](#top) `[not](a link.md)`\n```\n[nor](this.md)\n```\n")
    assert broken_links(page) == ["missing.png", "c.md#x"]


def test_documentation_links_resolve():
    pages = [p for pattern in DOCUMENTATION for p in sorted(REPO.glob(pattern))]
    assert REPO / "README.md" in pages
    broken = {str(p.relative_to(REPO)): found for p in pages if (found := broken_links(p))}
    assert not broken, f"relative links to no file: {broken}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "reference belongs in docs/, linked from the README")



# Where functions stay short enough to read at once (the package's CLI, experiments, data and eval, the benchmarks).
SHORT_FUNCTIONS = ["kdlora/cli.py", "kdlora/experiments/**/*.py", "kdlora/data/**/*.py", "kdlora/eval/**/*.py", "benchmarks/**/*.py"]
MAX_FUNCTION_LINES = 80


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of each function or method in `source` longer than `limit` lines."""
    import ast

    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_long_function_detector():
    short = "def f():\n    return 1\n"
    long = "def g(x):\n" + "    x += 1\n" * 80 + "    return x\n"
    nested = "class C:\n    def h(self):\n" + "        pass\n" * 81
    assert long_functions(short + long + nested) == [("g", 82), ("h", 82)]


def test_no_function_is_longer_than_the_limit():
    files = sorted({p for pattern in SHORT_FUNCTIONS for p in REPO.glob(pattern)})
    assert REPO / "kdlora" / "cli.py" in files and REPO / "benchmarks" / "results_files.py" in files
    found = {str(p.relative_to(REPO)): f for p in files if (f := long_functions(p.read_text(encoding="utf-8")))}
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them): {found}"


def test_benchmarks_do_not_patch_the_import_path():
    """kdlora is installed; a benchmark runs as ``python benchmarks/<name>.py``, beside the others."""
    patched = [str(p.relative_to(REPO)) for p in sorted((REPO / "benchmarks").glob("*.py"))
               if re.search(r"sys\.path\.(insert|append)|sys\.path\s*[+]?=", p.read_text(encoding="utf-8"))]
    assert not patched, f"benchmarks that change sys.path: {patched}"


def test_every_results_file_is_in_its_benchmark_s_folder():
    results = REPO / "benchmarks" / "results"
    loose = sorted(p.name for p in results.iterdir() if p.is_file())
    assert not loose, f"results files outside a benchmarks/results/<benchmark>/ folder: {loose}"
