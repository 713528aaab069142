"""A report for people: one HTML page per run that opens from disk (no server, no network).

    python -m fire_core.report results/default      # make report SCALE=default
    python -m fire_core.report results/default --check

``results/<run>/report/index.html`` holds the headline tables of stage 08, every figure of every
stage with its caption, a link to its sidecar (sources and hashes) and to the executed notebook
of the stage that made it (rendered as HTML under ``report/notebooks/``), and each stage's
manifest summary (commit, dirty tree, time, machine). Links are relative, so the folder can be
copied or zipped whole. ``--check`` verifies that every image and link on the page resolves to a
file, and, where headless Chromium is installed, renders the page to ``report/screenshot.png``
and checks that every image loaded.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fire_core import config

CAPTIONS = {
    "world_examples": "The synthetic world: example images of every task family with their questions and answers.",
    "loss_curve": "Training loss of the stage's model(s).",
    "example_dialogues": "Example dialogues: base model and FIRE student on the same sample, turn by turn.",
    "solved_by_turn": "Share of FIRE-Bench dialogues solved by turn t (teacher score at the threshold, or the "
                      "answer checker), with 95% bootstrap bands.",
    "score_curves": "DRESS multi-turn interaction: mean provider score after each turn (stage 07's own plot).",
    "dataset_stats": "FIRE's dataset statistics: dialogues per family in FIRE-100K, FIRE-1M and FIRE-Bench.",
    "free_dialogue": "FIRE-Bench free dialogue: AT, ADR, ATR, RR per model and feedback provider, 95% intervals.",
    "dress_multi_turn": "DRESS figure 3 analog: mean score after turns 1-4, oracle and trained teacher as providers.",
    "dress_measurements": "DRESS measurements per model: CHAIR_i, CHAIR_s, helpfulness, false-premise safety "
                          "(95% intervals).",
}
TABLES = [("paper_vs_ours.csv", "The papers beside ours"), ("free_dialogue_table.csv", "FIRE-Bench free dialogue"),
          ("cross_method_table.csv", "Every model on DRESS's measurements"),
          ("dataset_stats.csv", "Dataset statistics")]
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f2f2f2}figure{margin:1.5em 0;border-top:1px solid #ddd;
padding-top:.8em}img{max-width:100%}figcaption{font-size:14px;margin-top:.3em}.meta{font-size:12px;color:#555}"""


def _manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "manifest.json").read_text())


def _notebook_html(stage_dir: Path, out: Path) -> str | None:
    """The stage's executed notebook as HTML (nbconvert), or None when there is none."""
    nb = stage_dir / f"{stage_dir.name}.ipynb"
    if not nb.is_file():
        return None
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="classic").from_notebook_node(nbformat.read(nb, as_version=4))
    path = out / "notebooks" / f"{stage_dir.name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path.relative_to(out).as_posix()


def _table(csv: Path) -> str:
    """A results table as HTML. The paper-vs-ours table shows the findings first and names its
    sources once, below it."""
    import pandas as pd

    df = pd.read_csv(csv, keep_default_na=False)
    note = ""
    if "source" in df.columns:
        if "holds" in df.columns:
            df = pd.concat([df[df.holds != ""], df[df.holds == ""]], ignore_index=True)
        note = "<p class='meta'>Sources: " + "; ".join(html.escape(s) for s in dict.fromkeys(df.source)) + "</p>"
        df = df.drop(columns="source")
    return df.to_html(index=False, na_rep="", escape=True, border=0) + note


def build(run: Path) -> Path:
    """Write ``run/report/index.html``; returns its path."""
    run = Path(run).absolute()
    stages = [run / s for s in config.STAGES if (run / s / "manifest.json").is_file()]
    if not stages:
        raise FileNotFoundError(f"{run}: no finished stage to report on (run `make reproduce` first)")
    out = run / "report"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>FIRE + DRESS: {esc(run.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>FIRE + DRESS, run <code>{esc(run.name)}</code></h1>",
             "<p>Every number and figure below was read from this run's results files. Each figure links to its "
             "sidecar (the files it was drawn from, with their hashes) and to the executed notebook of the stage "
             "that made it. <code>make audit</code> checks both against the files.</p>"]
    figures_dir = run / "08_make_figures"
    if figures_dir.is_dir():
        parts.append("<h2>Headline tables</h2>")
        for name, title in TABLES:
            if (figures_dir / name).is_file():
                parts.append(f"<h3>{esc(title)}</h3>{_table(figures_dir / name)}")
    parts.append("<h2>The run</h2><table><tr><th>stage</th><th>commit</th><th>tree</th><th>finished</th>"
                 "<th>wall time</th><th>notebook</th></tr>")
    notebooks = {}
    for s in stages:
        m = _manifest(s)
        notebooks[s.name] = _notebook_html(s, out)
        nb = f"<a href='{esc(notebooks[s.name])}'>executed notebook</a>" if notebooks[s.name] else ""
        git = m.get("git") or {}
        parts.append(f"<tr><td>{esc(s.name)}</td><td><code>{esc(str(git.get('commit'))[:12])}</code></td>"
                     f"<td>{'dirty' if git.get('dirty') else 'clean'}</td><td>{esc(m.get('finished_at', ''))}</td>"
                     f"<td>{m.get('wall_time_s', 0):.0f} s</td><td>{nb}</td></tr>")
    first = _manifest(stages[0])
    parts.append(f"</table><p class='meta'>scale {esc(str(first.get('scale')))}, seed {first.get('seed')}, overrides "
                 f"{esc(json.dumps([o for o in first.get('overrides', []) if not o.startswith('paths.')]))}; "
                 f"Python {esc(str(first.get('python')))} on {esc(str(first.get('platform')))}; torch "
                 f"{esc(str(first.get('packages', {}).get('torch')))}</p>")
    parts.append("<h2>Figures</h2>")
    for s in stages:
        for side in sorted(s.glob("*.json")):
            data = json.loads(side.read_text())
            if not (isinstance(data, dict) and "figure" in data and "sources" in data):
                continue
            png = side.with_suffix(".png")
            rel = lambda p: "../" + p.relative_to(run).as_posix()  # noqa: E731
            sources = ", ".join(f"<code>{esc(k)}</code>" for k in data["sources"])
            nb = notebooks.get(s.name)
            parts.append(f"<figure id='{esc(s.name)}-{esc(side.stem)}'><img src='{esc(rel(png))}' "
                         f"alt='{esc(side.stem)}'><figcaption><b>{esc(s.name)} / {esc(side.stem)}.</b> "
                         f"{esc(CAPTIONS.get(side.stem, ''))}<br><span class='meta'>drawn from {sources}; "
                         f"<a href='{esc(rel(side))}'>sidecar</a>"
                         + (f", <a href='{esc(nb)}'>notebook</a>" if nb else "")
                         + f", <a href='{esc(rel(side.with_suffix('.pdf')))}'>PDF</a></span></figcaption></figure>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index


def broken_links(index: Path) -> list[str]:
    """Every src/href on the page that does not resolve to a file beside it (external links count
    as broken: the page must open with no network)."""
    text = index.read_text()
    bad = []
    for ref in re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text):
        target = html.unescape(ref).split("#", 1)[0]
        if re.match(r"^[a-z]+:", target) or not target or not (index.parent / target).resolve().is_file():
            bad.append(ref)
    return bad


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(index: Path) -> tuple[Path | None, str]:
    """Render the page in headless Chromium to ``screenshot.png``, and report how many images
    failed to load (read back from the DOM Chromium dumps). (None, why) without Chromium."""
    exe = chromium()
    if exe is None:
        return None, "headless Chromium is not installed (Debian: apt-get install chromium); the page was not rendered"
    shot = index.parent / "screenshot.png"
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", index.as_uri()], capture_output=True,
                   timeout=120, check=False)
    # the DOM after load, with each image's natural width written into it by a tiny script
    probe = index.parent / "probe.html"
    probe.write_text(index.read_text().replace(
        "</body>", "<script>window.onload=()=>{for(const i of document.images){i.setAttribute('data-loaded',"
                   "i.complete&&i.naturalWidth>0?'yes':'no')}}</script></body>"))
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120, check=False).stdout
    probe.unlink()
    failed = dom.count("data-loaded=\"no\"")
    loaded = dom.count("data-loaded=\"yes\"")
    return (shot if shot.is_file() else None), f"{loaded} images loaded, {failed} failed"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fire_core.report", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder, e.g. results/default")
    ap.add_argument("--check", action="store_true", help="check links and images (and render, where Chromium is)")
    args = ap.parse_args(argv)
    try:
        index = build(Path(args.run))
    except FileNotFoundError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"report: {index}\n")
    if not args.check:
        return 0
    bad = broken_links(index)
    for ref in bad:
        sys.stdout.write(f"FAIL  broken link or image: {ref}\n")
    shot, note = screenshot(index)
    sys.stdout.write(f"{'ok' if shot else 'skip'}  render: {note}" + (f" -> {shot}" if shot else "") + "\n")
    failed_images = shot is not None and not note.endswith(" 0 failed")
    return 1 if bad or failed_images else 0


if __name__ == "__main__":
    sys.exit(main())
