"""Which code writes each markdown file in benchmarks/results, and rewriting them from their JSON.

Each benchmark writes into its own folder, ``benchmarks/results/<benchmark>/`` (``report/``: the
reports of `kdlora.experiments.report`; ``passk/``: `kdlora.eval.passk` runs). Every ``<name>.md`` there is rendered by code from the ``<name>.json`` beside it (for
``<dir>/results.md``: ``<dir>/results.json``); no number in it is typed by hand. Prose that interprets a
result lives in ``<name>_notes.md`` beside it, which the renderer puts under the title. The exceptions,
records whose runs are gone and whose numbers no JSON holds, are listed in ARCHIVAL and say so under
their title.

    python benchmarks/results_files.py                  # rewrite every registered md from its JSON
    python benchmarks/results_files.py mlfs_palette/mlfs_palette   # only these (path under results/ without .md)
    python benchmarks/results_files.py --check          # rewrite nothing; exit 1 naming each md that differs

``results/<name>/<name>.md`` written by ``benchmarks/<name>.py`` needs no registering: that script's top-level
``render`` is its renderer. Any other results file is registered with one line in RENDERERS: its name
(a glob over the path under benchmarks/results without ``.md``) and ``"module:function"``, a module of
benchmarks/ or of the package whose ``function(data: dict) -> str`` is the exact markdown; where ``<name>_notes.md``
exists it is called as ``function(data, notes)`` with the notes' text. The script that measures
writes its md through the same function, so the md it writes and the one rendered here agree.

Notes quote numbers, they do not make them: a number in a notes file must be one its results (the
JSON and the rendered md beside it, and those of results files it names in backticks) show, at the
precision written. Settings and names go in code spans (backticks), which that check skips.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import fnmatch
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"

RENDERERS: dict[str, str] = {
    "decoder_palette/decoder_palette": "decoder_palette:render_report",
    "decoder_palette/decoder_palette_leading": "decoder_palette:render_report",
    "decoder_palette/decoder_palette_latency": "decoder_palette:render_latency",
    "fast_path_seeds/fast_path_seeds*": "fast_path_seeds:markdown",
    "kdlora_diagnosis/minilm_kdlora_diagnosis*": "kdlora_diagnosis:render",
    "report/minilm_report*": "kdlora.experiments.report:render",
    "mlfs_palette/mlfs_ablations_*": "mlfs_palette:render_ablations",
    "mlfs_palette/mlfs_palette": "mlfs_palette:render_table",
    "mlfs_palette/mlfs_seeds_*": "mlfs_palette:render_seeds",
    "mlfs_palette/mlfs_decision_*": "mlfs_palette:render_decision",
    "palette_latency/palette_latency*": "palette_latency:render",
    "passk/passk_*/results": "results_files:render_passk",
    "slice_start/slice_start_*": "slice_start:render",
    "lm_perplexity/smollm2_cpu": "lm_perplexity:render",
    "supernet_step/supernet_step": "supernet_step:markdown",
}

# Markdown files in benchmarks/results that no code renders, each with why. Each says so under its title
# (ARCHIVAL_BANNER); nothing may join this list that has data to render from.
ARCHIVAL: dict[str, str] = {
    "report/minilm_glue": "the first MiniLM GLUE runs, a hand-typed log; the runs are gone and minilm_report.json holds their tables",
}
ARCHIVAL_BANNER = "**Archival record, typed by hand.**"

NOTES_SUFFIX = "_notes"


def name_of(md: Path) -> str:
    """The registry name of a results markdown file: its path under benchmarks/results without ``.md``."""
    return md.relative_to(RESULTS).with_suffix("").as_posix()


def is_notes(md: Path) -> bool:
    return md.stem.endswith(NOTES_SUFFIX)


def results_markdown_files() -> list[Path]:
    """Every markdown file in benchmarks/results that is not a notes file."""
    return sorted(p for p in RESULTS.rglob("*.md") if not is_notes(p))


def defines_render(script: Path) -> bool:
    """Whether the benchmark `script` defines a top-level ``render`` function (read, not imported)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    return any(isinstance(node, ast.FunctionDef) and node.name == "render" for node in tree.body)


def renderer_for(md: Path) -> Optional[str]:
    """``"module:function"`` that renders `md`: its entry in RENDERERS, else ``render`` of the benchmark
    script whose folder and name it has (``results/<name>/<name>.md`` from ``benchmarks/<name>.py``) where it
    defines one."""
    name = name_of(md)
    matches = [spec for pattern, spec in RENDERERS.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(matches) > 1:
        raise ValueError(f"{name} matches more than one entry of RENDERERS: {', '.join(matches)}")
    if matches:
        return matches[0]
    folder, _, stem = name.partition("/")
    script = BENCHMARKS / f"{folder}.py"
    return f"{folder}:render" if stem == folder and script.is_file() and defines_render(script) else None


def load_renderer(spec: str) -> Callable[[dict, Optional[str]], str]:
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def notes_for(md: Path) -> Optional[Path]:
    """``<name>_notes.md`` beside ``<name>.md``, when there is one."""
    notes = md.with_name(md.stem + NOTES_SUFFIX + ".md")
    return notes if notes.is_file() else None


def read_notes(path: Optional[str | Path]) -> Optional[str]:
    """The notes a renderer puts under the title: the file's text without surrounding blank lines."""
    return Path(path).read_text().strip() if path and Path(path).is_file() else None


def notes_for_output(out: str | Path, notes: Optional[str | Path] = None) -> Optional[str]:
    """The notes a benchmark writes the results file `out` (its path without ``.md``) with: the file `notes`
    when given, else ``<out>_notes.md`` where it exists, the one `render_file` renders it with."""
    return read_notes(notes) if notes else read_notes(notes_for(Path(f"{out}.md")))


def render_file(md: Path) -> str:
    """The markdown that `md`'s renderer makes from the JSON beside it (and its notes)."""
    spec = renderer_for(md)
    if spec is None:
        raise LookupError(f"{name_of(md)}.md has no renderer: register it in RENDERERS of {Path(__file__).name}")
    source = md.with_suffix(".json")
    if not source.is_file():
        raise FileNotFoundError(f"{md} has no JSON beside it ({source.name}) to render from")
    render, notes = load_renderer(spec), read_notes(notes_for(md))
    data = json.loads(source.read_text())
    return render(data) if notes is None else render(data, notes)


def render_passk(result: dict, notes: Optional[str] = None) -> str:
    """``results.md`` of `python -m kdlora.eval.passk` from its ``results.json`` (the title as its main writes it)."""
    from kdlora.eval.passk import results_markdown

    title = f"pass@k of {Path(result['model']).name} ({len(result['problems'])} problems, n={result['n']}, T={result['temperature']:g})"
    text = results_markdown(result, title)
    return text if notes is None else text.replace("\n\n", f"\n\n{notes}\n\n", 1)


NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
# Words that carry digits without being quantities: subnet names (h384-a9-f1152-l0.3.5), model and task
# names (MiniLM-L6, SST-2, SmolLM2-135M), fp32, n1/nj.
NAME = re.compile(r"(?<![\w.])[A-Za-z_][\w\-./]*\d[\w\-./]*")
COUNTS = range(0, 11)  # small integers count things ("one of 3 seeds", "2 cores"): not checked


def numbers_in(text: str) -> list[str]:
    """The numbers a notes file states: outside code spans (settings, commands, names) and names."""
    text = re.sub(r"`[^`]*`", " ", text)
    text = NAME.sub(" ", text)
    return [m.group(0) for m in NUMBER.finditer(text)]


def _values(data) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)]
    if isinstance(data, str):
        return [float(n.replace(",", "")) for n in NUMBER.findall(data)]
    if isinstance(data, dict):
        return [v for k, x in data.items() for v in _values(k) + _values(x)]
    if isinstance(data, list):
        return [v for x in data for v in _values(x)]
    return []


def results_values(md: Path) -> list[float]:
    """What a notes file may quote from the results file `md`: every number of its JSON (as it is, ×100 for
    fractions, in millions, thousands, and seconds as minutes) and every number its rendered md shows
    without the notes (code spans included: commands carry the settings)."""
    values = []
    source = md.with_suffix(".json")
    if source.is_file():
        for v in _values(json.loads(source.read_text())):
            values += [v, 100 * v, v / 1e6, v / 1e3, v / 60]
    spec = renderer_for(md) if md.is_relative_to(RESULTS) else None
    text = (load_renderer(spec)(json.loads(source.read_text())) if spec and source.is_file()
            else md.read_text() if md.is_file() else "")
    values += [float(n.replace(",", "")) for n in NUMBER.findall(text)]
    return values


def unbacked_numbers(notes: Path) -> list[str]:
    """The numbers of a notes file that neither its results (``<name>.md`` beside it) nor the results files it
    names in backticks (``name.md``, ``name.json``, ``dir/`` for its ``results.md``) show at the precision
    written (``6.9e5``: to 0.05e5); small counts (`COUNTS`) are not checked."""
    text = notes.read_text()
    sources = [notes.with_name(notes.name.replace(NOTES_SUFFIX + ".md", ".md"))]
    named = dict.fromkeys(re.findall(r"`([\w./-]+\.(?:md|json)|[\w./-]+/)`", text))  # ../<benchmark>/...: another folder's
    sources += [Path(os.path.normpath(notes.parent / n / ("results.md" if n.endswith("/") else ""))) for n in named]
    values = sorted({v for md in sources for v in results_values(md.with_suffix(".md"))})
    missing = []
    for written in numbers_in(text):
        value = float(written.replace(",", ""))
        if value in COUNTS:
            continue
        mantissa, _, exponent = written.lower().partition("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        tolerance = 0.5 * 10 ** (int(exponent or 0) - decimals) * (1 + 1e-9)
        i = bisect.bisect_left(values, value - tolerance)
        if not (i < len(values) and values[i] <= value + tolerance):
            missing.append(written)
    return missing


def main(argv: Optional[list[str]] = None) -> int:
    from kdlora.io import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="results to render (default: every registered one)")
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 naming every md that differs")
    a = ap.parse_args(argv)
    files = [md for md in results_markdown_files() if renderer_for(md) is not None]
    if a.names:
        known = {name_of(md): md for md in files}
        unknown = [n for n in a.names if n not in known]
        if unknown:
            ap.error(f"not a registered results file: {', '.join(unknown)} (known: {', '.join(known)})")
        files = [known[n] for n in a.names]
    rendered, failed = {}, []
    for md in files:  # every renderer runs before anything is written
        try:
            rendered[md] = render_file(md)
        except (KeyError, TypeError, ValueError, LookupError, OSError) as e:  # a JSON its renderer does not fit
            failed.append(f"cannot render {name_of(md)}.md from its JSON: {type(e).__name__}: {e}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    stale = [md for md, text in rendered.items() if md.read_text() != text]
    for md in stale:
        if a.check:
            print(f"differs from its JSON: {md.relative_to(RESULTS.parent.parent)}")
        else:
            write_atomic(md, rendered[md])
            print(f"rewrote {md.relative_to(RESULTS.parent.parent)}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
