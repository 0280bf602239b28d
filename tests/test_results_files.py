"""Every markdown file in benchmarks/results is what its renderer makes of the JSON beside it, and its
notes quote only numbers its results show (`benchmarks/results_files.py`). Pure file reads: nothing is run."""

import difflib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_files  # noqa: E402

RENDERED = [md for md in results_files.results_markdown_files() if results_files.renderer_for(md)]
NOTES = sorted(results_files.RESULTS.rglob(f"*{results_files.NOTES_SUFFIX}.md"))


def test_every_results_markdown_has_a_renderer():
    unknown = [results_files.name_of(md) for md in results_files.results_markdown_files()
               if results_files.renderer_for(md) is None and results_files.name_of(md) not in results_files.ARCHIVAL]
    assert not unknown, (f"no renderer for {', '.join(f'{n}.md' for n in unknown)}: define render(data, notes=None) "
                         "in benchmarks/<name>.py, or add a line to RENDERERS in benchmarks/results_files.py naming "
                         "the function that writes it from its JSON")


def test_a_benchmark_script_s_render_needs_no_registering(tmp_path, monkeypatch):
    monkeypatch.setattr(results_files, "BENCHMARKS", tmp_path)
    (tmp_path / "fresh.py").write_text("def render(data, notes=None):\n    return f\"# {data['x']}\\n\"\n")
    (tmp_path / "plain.py").write_text("def main():\n    pass\n")
    assert results_files.renderer_for(results_files.RESULTS / "fresh" / "fresh.md") == "fresh:render"
    assert results_files.renderer_for(results_files.RESULTS / "plain" / "plain.md") is None
    assert results_files.renderer_for(results_files.RESULTS / "mlfs_palette" / "mlfs_seeds_sst2.md") == "mlfs_palette:render_seeds"


def test_archival_files_say_so_and_are_not_rendered():
    for name in results_files.ARCHIVAL:
        md = results_files.RESULTS / f"{name}.md"
        assert md.is_file(), f"ARCHIVAL names {name}.md, which does not exist"
        assert results_files.renderer_for(md) is None, f"{name}.md has a renderer: it is not archival"
        assert not md.with_suffix(".json").is_file(), f"{name}.md has a JSON to be rendered from: register it instead"
        assert results_files.ARCHIVAL_BANNER in md.read_text().split("\n\n", 2)[1], f"{name}.md does not say it is archival under its title"


@pytest.mark.parametrize("md", RENDERED, ids=[results_files.name_of(md) for md in RENDERED])
def test_markdown_is_rendered_from_its_json(md):
    expected = results_files.render_file(md)
    written = md.read_text()
    if written != expected:
        diff = "".join(list(difflib.unified_diff(written.splitlines(True), expected.splitlines(True),
                                                 f"{md.name} (as committed)", f"{md.name} (rendered from its JSON)", n=1))[:60])
        pytest.fail(f"{md.name} is not what its JSON renders to (python benchmarks/results_files.py "
                    f"{results_files.name_of(md)} rewrites it):\n{diff}")


@pytest.mark.parametrize("notes", NOTES, ids=[n.name for n in NOTES])
def test_notes_quote_only_numbers_their_results_show(notes):
    assert results_files.unbacked_numbers(notes) == []


def test_notes_check_finds_a_number_the_results_do_not_show(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"dev": 0.76188, "ppl": 692130.0, "wall_s": 1194.0}))
    (tmp_path / "run.md").write_text("# run\n\n| dev |\n|---|\n| 76.2 |\n")
    (tmp_path / "other.json").write_text(json.dumps({"score": 0.412}))
    notes = tmp_path / "run_notes.md"
    backed = ("Dev 76.2 (0.76 as a fraction), perplexity 6.9e5, 19.9 min, `640` examples, h384-a9-f1152-l0.3.5, "
              "SST-2, one of 3 seeds; `other.json`: 41.2.")
    notes.write_text(backed)
    assert results_files.unbacked_numbers(notes) == []
    notes.write_text(backed + " Every member gains 14–18 points; 7.0e5; 76.9; 41.3.")
    assert results_files.unbacked_numbers(notes) == ["14", "18", "7.0e5", "76.9", "41.3"]


def test_numbers_in_skips_names_and_code_spans():
    text = "h256-a6-f768-l0.3.5 at 22.71M, SmolLM2-135M, `--train-samples 640`, n1/nj, 3,668 pairs, 2.2e6 to 6.9e5"
    assert results_files.numbers_in(text) == ["22.71", "3,668", "2.2e6", "6.9e5"]


def test_check_and_unknown_names(capsys):
    name = results_files.name_of(RENDERED[0])
    assert results_files.main(["--check", name]) == 0
    with pytest.raises(SystemExit) as e:
        results_files.main(["--check", "no_such_results"])
    assert e.value.code == 2
    assert "not a registered results file: no_such_results" in capsys.readouterr().err


def test_rewriting_writes_nothing_when_a_json_does_not_fit_its_renderer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results_files, "BENCHMARKS", tmp_path)
    monkeypatch.setattr(results_files, "RESULTS", tmp_path / "results")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fresh_bench.py").write_text("def render(data, notes=None):\n    return f\"# {data['x']}\\n\"\n")
    folder = tmp_path / "results" / "fresh_bench"
    folder.mkdir(parents=True)
    for name, data in (("fresh_bench", {"y": 1}), ("fresh_bench_b", {"x": 2})):
        (folder / f"{name}.json").write_text(json.dumps(data))
        (folder / f"{name}.md").write_text("# typed\n")
    monkeypatch.setattr(results_files, "RENDERERS", {"fresh_bench/fresh_bench_b": "fresh_bench:render"})
    assert results_files.main([]) == 1
    assert "cannot render fresh_bench/fresh_bench.md from its JSON: KeyError: 'x'" in capsys.readouterr().err
    assert [(folder / f"{n}.md").read_text() for n in ("fresh_bench", "fresh_bench_b")] == ["# typed\n"] * 2
    (folder / "fresh_bench.json").write_text(json.dumps({"x": 1}))
    assert results_files.main(["--check"]) == 1
    assert results_files.main([]) == 0
    assert [(folder / f"{n}.md").read_text() for n in ("fresh_bench", "fresh_bench_b")] == ["# 1\n", "# 2\n"]
    assert results_files.main(["--check"]) == 0
