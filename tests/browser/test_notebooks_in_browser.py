"""The notebooks and report.html as a user meets them: JupyterLab 4 in headless Chromium.

Each notebook is opened in JupyterLab, run with Run All, and checked once the kernel is idle: no
error output, no MONAI nvImageCodec notice, every widget output rendered as a widget (no "Error
displaying widget", no ``VBox(children=...)`` text), every plotly output drawn, no cut-off viewer
label or readout. In ``00_data_prep`` and ``30_uncertainty_maps`` the viewer is driven with the
mouse: dragging the slice slider and switching the plane change the displayed image, and a new
plane starts at its middle slice. Then the ``report.html`` that ``40_compare`` wrote in the same
run is opened from disk: every plotly figure renders, a point's hover label reads as text for
people, the Dice axis spans 0–1, the comparison is a table (no raw ``|---|``) and no table runs
off the page. The notebooks depend on each other (data from 00, fine-tuning runs from 20 and 31
for 40), so they run in their numeric order, as the pipeline runs them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
VIEWER_NOTEBOOKS = ("00_data_prep", "30_uncertainty_maps")  # viewers driven with the mouse
RUN_TIMEOUT_S = 600  # one notebook's Run All (the slowest takes ~35 s at the smoke profile)
REPORT = Path("runs") / "notebooks" / "compare-smoke" / "report.html"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_MIME = "application/vnd.plotly.v1+json"

START_RUN_ALL = """() => {
  window.__medsslRun = null;
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    ok => { window.__medsslRun = {ok}; },
    err => { window.__medsslRun = {error: String(err)}; });
}"""
KERNEL_IDLE = """path => {
  const w = window.jupyterapp?.shell?.currentWidget;
  return !!w && w.context?.path === path && w.sessionContext?.session?.kernel?.status === 'idle';
}"""
# Every code cell's outputs, from the notebook model (what the kernel sent).
CELL_OUTPUTS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const out = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    out.push({index: i, count: cell.executionCount, outputs: cell.outputs.toJSON().map(o => ({
      type: o.output_type, name: o.name || null, ename: o.ename || null, evalue: o.evalue || null,
      traceback: (o.traceback || []).slice(-3).join('\\n'), mimes: Object.keys(o.data || {}),
      text: Array.isArray(o.text) ? o.text.join('') : (o.text || '')}))});
  }
  return out;
}"""
# What the page shows for those outputs.
RENDERED_OUTPUTS = """() => {
  const outputs = [...document.querySelectorAll('.jp-OutputArea-output')];
  const text = outputs.map(o => o.innerText || '');
  return {
    widgets: outputs.filter(o => !o.dataset.mimeType && !o.matches('.jp-RenderedPlotly'))
      .map(o => !!o.querySelector('.jupyter-widgets')),
    plotly: outputs.filter(o => o.matches('.jp-RenderedPlotly'))
      .map(o => !!o.querySelector('.main-svg .scatterlayer .trace')),
    errors: text.filter(t => t.includes('Error displaying widget')),
    reprs: text.filter(t => /\\b(VBox|HBox|Tab|GridBox)\\((children|layout)=/.test(t)),
  };
}"""
# Visible viewer labels and readouts whose text does not fit their box (cut off, "uncertaint…").
CUT_LABELS = """() => [...document.querySelectorAll(
    '.jp-OutputArea-output .widget-vbox:has(> img.widget-image) :is(.widget-label, '
    + '.widget-label-basic, .widget-readout)')]
  .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
  .map(e => e.textContent)"""


def _open_notebook(context, lab_url: str, name: str):
    page = context.new_page()
    page.set_viewport_size({"width": 1280, "height": 1000})
    path = f"notebooks/{name}.ipynb"
    page.goto(f"{lab_url}/lab/tree/{path}?reset", wait_until="domcontentloaded")
    page.wait_for_function(KERNEL_IDLE, arg=path, timeout=180_000, polling=500)
    return page, path


def _close_notebook(page) -> None:
    try:
        page.evaluate(
            "async () => { const w = window.jupyterapp.shell.currentWidget;"
            " await w.sessionContext.shutdown(); w.dispose(); }"
        )
    finally:
        page.close()


def _problems(cells: list[dict]) -> list[str]:
    problems = []
    for cell in cells:
        for out in cell["outputs"]:
            if out["type"] == "error":
                problems.append(
                    f"cell {cell['index']}: {out['ename']}: {out['evalue']}\n{out['traceback']}"
                )
            if out["name"] == "stderr" and "nvImageCodec" in out["text"]:
                problems.append(f"cell {cell['index']}: MONAI's codec notice: {out['text'][:200]}")
    return problems


def _wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(0.25)


def _exercise_viewer(page, name: str, artifacts: Path) -> None:
    """Drag the slice slider and switch the plane of the notebook's first viewer; each must
    change the displayed image, and the new plane must start at its middle slice."""
    viewer = page.locator(".jp-OutputArea-output .widget-vbox:has(> img.widget-image)").first
    viewer.scroll_into_view_if_needed()
    image = viewer.locator("img.widget-image")
    slider = viewer.locator(".widget-slider").filter(has=page.get_by_text("slice", exact=True))
    handle = slider.locator(".noUi-handle")

    def position() -> tuple[int, int]:
        now, top = handle.get_attribute("aria-valuenow"), handle.get_attribute("aria-valuemax")
        return round(float(now)), round(float(top))

    def shows_new(before_src: str, before_png: bytes) -> bool:
        return image.get_attribute("src") != before_src and image.screenshot() != before_png

    viewer.screenshot(path=str(artifacts / f"{name}-viewer.png"))
    start, top = position()
    src, png = image.get_attribute("src"), image.screenshot()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 60 if start > top / 2 else x + 60, y, steps=6)
    page.mouse.up()
    _wait_until(lambda: position()[0] != start, 15, "the dragged slider moves")
    _wait_until(lambda: shows_new(src, png), 30, "the dragged slider changes the image")
    dragged = position()[0]

    src, png = image.get_attribute("src"), image.screenshot()
    viewer.get_by_role("button", name="coronal", exact=True).click()
    _wait_until(lambda: shows_new(src, png), 30, "switching to coronal changes the image")
    axial = (dragged, top)
    _wait_until(lambda: position() != axial, 15, "the slider follows the coronal plane")
    now, top = position()
    assert now == (top + 1) // 2, (
        f"switching plane re-centres the slider: slice {now} of 0..{top}, expected {(top + 1) // 2}"
    )
    viewer.screenshot(path=str(artifacts / f"{name}-viewer-coronal.png"))


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_renders_in_jupyterlab(
    name, browser, lab_url, artifacts, on_failure_screenshot
):
    page, path = _open_notebook(browser.contexts[0], lab_url, name)
    try:
        with on_failure_screenshot(page, name):
            page.evaluate(START_RUN_ALL)
            page.wait_for_function(
                "() => window.__medsslRun !== null", timeout=RUN_TIMEOUT_S * 1000, polling=1000
            )
            page.wait_for_function(KERNEL_IDLE, arg=path, timeout=60_000, polling=500)
            cells = page.evaluate(CELL_OUTPUTS)
            problems = _problems(cells)
            assert not problems, f"{name}: error outputs:\n" + "\n".join(problems)
            unrun = [c["index"] for c in cells if c["count"] is None]
            assert not unrun, f"{name}: cells {unrun} did not run"
            page.wait_for_function(
                "() => ![...document.querySelectorAll('.jp-OutputArea-output')]"
                ".some(o => (o.innerText || '').includes('Loading widget'))",
                timeout=60_000,
            )
            shown = page.evaluate(RENDERED_OUTPUTS)
            sent = [o for c in cells for o in c["outputs"] if WIDGET_MIME in o["mimes"]]
            assert not shown["errors"] and not shown["reprs"], (
                f"{name}: widgets shown as errors or text: {shown['errors'] + shown['reprs']}"
            )
            assert len(shown["widgets"]) == len(sent) and all(shown["widgets"]), (
                f"{name}: {len(sent)} widget outputs, rendered: {shown['widgets']}"
            )
            drawn = shown["plotly"]
            plotted = [o for c in cells for o in c["outputs"] if PLOTLY_MIME in o["mimes"]]
            assert len(drawn) == len(plotted) and all(drawn), f"{name}: plotly drawn: {drawn}"
            cut = page.evaluate(CUT_LABELS)
            assert not cut, f"{name}: viewer labels or readouts cut off: {cut}"
            if name in VIEWER_NOTEBOOKS:
                assert sent, f"{name}: the notebook shows a viewer"
                _exercise_viewer(page, name, artifacts)
    finally:
        _close_notebook(page)


def test_report_html_renders_offline(browser, lab_root, artifacts, on_failure_screenshot):
    report = lab_root / REPORT
    if not report.exists():
        pytest.fail(f"{REPORT} was not written; see the 40_compare test above")
    page = browser.contexts[0].new_page()
    page.set_viewport_size({"width": 1000, "height": 900})
    try:
        with on_failure_screenshot(page, "report"):
            page.goto(report.as_uri())
            n_figures = report.read_text().count('class="plotly-graph-div"')
            assert n_figures >= 1, "report.html holds the interactive label-efficiency figure"
            page.wait_for_function(
                "n => { const g = [...document.querySelectorAll('.js-plotly-plot')];"
                " return g.length === n && g.every(d => d._fullLayout"
                " && d.querySelector('.main-svg .scatterlayer .trace')); }",
                arg=n_figures,
                timeout=60_000,
            )
            page.screenshot(path=str(artifacts / "report.png"), full_page=True)

            text = page.locator("body").inner_text()
            assert "|---|" not in text and not re.search(r"^\s*\| method", text, re.M), (
                "no raw Markdown table is visible"
            )
            first = page.locator("h2:text-is('Comparison') ~ .table-wrap table").first
            assert "organ Dice" in first.locator("thead").inner_text(), (
                "the Comparison section opens with the comparison table"
            )

            ranges = page.evaluate(
                "() => [...document.querySelectorAll('.js-plotly-plot')]"
                ".filter(d => (d._fullLayout.yaxis.title.text || '').toLowerCase() === 'dice')"
                ".map(d => d._fullLayout.yaxis.range)"
            )
            assert ranges and all(r == [0, 1] for r in ranges), f"Dice axes span 0-1: {ranges}"

            figure = page.locator(".js-plotly-plot").first
            figure.scroll_into_view_if_needed()
            point = figure.locator(".scatterlayer .trace .points path").first
            box = point.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            label = figure.locator(".hoverlayer .hovertext").first
            label.wait_for(state="visible", timeout=10_000)
            hover = "\n".join(
                label.locator("tspan.line").all_text_contents() or [label.text_content()]
            )
            figure.screenshot(path=str(artifacts / "report-hover.png"))
            assert "labelled case" in hover and "seed" in hover, f"hover label: {hover!r}"
            budget, *_, counts = hover.splitlines()[1:]
            assert re.fullmatch(r"\d+ labelled cases?|\d+% of the labelled cases", budget), hover
            assert re.fullmatch(r"\d+ seeds?, \d+ test cases?", counts), hover
            assert not re.search(r"\b1 (seeds|labelled cases|test cases)\b", hover), (
                f"singular nouns for one: {hover!r}"
            )

            layout = page.evaluate(
                "() => ({page: document.documentElement.scrollWidth, view: window.innerWidth,"
                " body: document.body.getBoundingClientRect().right,"
                " tables: [...document.querySelectorAll('table')].map(t => {"
                "   const box = t.closest('.table-wrap');"
                "   return box ? {overflow: getComputedStyle(box).overflowX,"
                "                 right: box.getBoundingClientRect().right} : null; })})"
            )
            assert layout["page"] <= layout["view"], f"the page scrolls sideways: {layout}"
            for table in layout["tables"]:
                assert table is not None and table["overflow"] in ("auto", "scroll"), layout
                assert table["right"] <= layout["body"] + 1, f"a table runs off the page: {layout}"
    finally:
        page.close()
