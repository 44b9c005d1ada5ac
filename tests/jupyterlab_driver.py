"""Driving a real JupyterLab through Debian's Chromium with Playwright, for tests/test_browser.py: the settings of
the lab and the browser, a handle on a running lab (`Lab`), and the page helpers that run cells, read widgets,
find cut-off labels and take screenshots (saved under artifacts/browser/).
"""
from __future__ import annotations

import importlib.util
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from test_notebooks import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "artifacts" / "browser"
LAB_START_S = 90
RUN_S = 240  # running a notebook that starts a cluster
WAIT_MS = 60_000

# JupyterLab user settings: no news or update checks (no network, no toasts over the page), and every cell
# kept in the page (no windowing), so off-screen outputs can be queried.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# JavaScript run in the page; JupyterLab is started with expose_app_in_browser, so `window.jupyterapp` exists.
NOTEBOOK_JS = "window.jupyterapp && window.jupyterapp.shell.currentWidget"
KERNEL_STATUS_JS = f"""() => {{
    const nb = {NOTEBOOK_JS};
    const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
    return kernel ? kernel.status : null;
}}"""
CELLS_DONE_JS = f"""(upto) => {{
    const nb = {NOTEBOOK_JS};
    if (!nb || !nb.content) return false;
    const cells = nb.content.widgets.slice(0, upto === null ? undefined : upto);
    const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
    return kernel && kernel.status === 'idle' &&
        cells.every(c => c.model.type !== 'code' || c.model.executionCount !== null);
}}"""
ERRORS_JS = f"""() => {{
    const nb = {NOTEBOOK_JS};
    return nb.content.widgets.filter(c => c.model.type === 'code')
        .flatMap(c => c.model.outputs.toJSON())
        .filter(o => o.output_type === 'error')
        .map(o => o.ename + ': ' + o.evalue);
}}"""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (what to install), or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install chromium"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


def http_status(url: str) -> int:
    """The HTTP status of a GET of `url`; 0 while nothing listens there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


class Lab:
    """A running JupyterLab: its base URL, token, root folder and log."""

    def __init__(self, url: str, token: str, root: Path, log: Path):
        self.url, self.token, self.root, self.log = url, token, root, log

    def open(self, page, notebook: str) -> None:
        """Open a notebook alone in a fresh workspace (`reset`) and wait for it to be current, its kernel idle."""
        page.goto(f"{self.url}/lab/tree/{notebook}?reset&token={self.token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=WAIT_MS)
        page.wait_for_function(f"""path => {{
            const nb = {NOTEBOOK_JS};
            return nb && nb.context && nb.context.path === path && nb.context.isReady;
        }}""", arg=notebook, timeout=WAIT_MS)
        page.wait_for_function(f"() => ({KERNEL_STATUS_JS})() === 'idle'", timeout=WAIT_MS)

    def shutdown_kernels(self) -> None:
        """Shut every kernel down cleanly (a kernel's shutdown also stops the clusters it started)."""
        for kernel in self.api("/api/kernels"):
            self.api(f"/api/kernels/{kernel['id']}", method="DELETE")

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None


def process_tree(pid: int) -> set[psutil.Process]:
    """The process and all its descendants; empty once it is gone."""
    try:
        process = psutil.Process(pid)
        return {process, *process.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def shot(page, name: str, element=None) -> Path:
    """Save a screenshot of the page (or of one element) under artifacts/browser/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    (element or page).screenshot(path=str(path))
    return path


def run_cells(page, command: str, upto: int | None, timeout_s: float = RUN_S) -> None:
    """Run a notebook command (run all, run all above) and wait until those cells ran and the kernel is idle."""
    page.evaluate("command => { window.jupyterapp.commands.execute(command); }", command)
    page.wait_for_function(CELLS_DONE_JS, arg=upto, timeout=timeout_s * 1000)
    errors = page.evaluate(ERRORS_JS)
    assert not errors, f"cells failed in the browser: {errors}"


def select_cell(page, index: int) -> int:
    """Make cell `index` (negative: from the end) the active cell; returns its index."""
    return page.evaluate(f"""index => {{
        const nb = {NOTEBOOK_JS};
        const i = index < 0 ? nb.content.widgets.length + index : index;
        nb.content.activeCellIndex = i;
        return i;
    }}""", index)


def labelled_input(root, label: str):
    """The input of an ipywidgets control whose description is exactly `label`."""
    box = root.locator(".widget-inline-hbox", has=root.page.locator("label.widget-label",
                                                                      has_text=re.compile(f"^{re.escape(label)}$")))
    return box.locator("input")


# Text cut off inside a tool: labels and buttons narrower than their text (the browser cuts it with an
# ellipsis), and drop-downs narrower than their longest option (measured in the select's own font; 24 px is
# the arrow).
CLIPPED_JS = """root => {
    const clipped = [];
    for (const el of root.querySelectorAll('label.widget-label, button, .widget-label, .widget-label-basic span')) {
        if (el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1) clipped.push(el.textContent.trim());
    }
    const probe = document.createElement('span');
    probe.style.cssText = 'position:absolute;visibility:hidden;white-space:pre';
    document.body.appendChild(probe);
    for (const select of root.querySelectorAll('select')) {
        if (select.offsetParent === null) continue;  // a hidden row (compare mode off) has no width to judge
        probe.style.font = getComputedStyle(select).font;
        for (const option of select.options) {
            probe.textContent = option.text;
            if (probe.offsetWidth + 24 > select.clientWidth) clipped.push(option.text);
        }
    }
    probe.remove();
    return clipped;
}"""


def assert_no_clipped_labels(root) -> None:
    clipped = root.evaluate(CLIPPED_JS)
    assert not clipped, f"labels cut off in the widget: {clipped}"


def set_field(root, label: str, value: str) -> None:
    """Type a value into a labelled ipywidgets field and leave it, as a person would (Tab sends it)."""
    field = labelled_input(root, label)
    field.fill(value)
    field.press("Tab")


def clean_up(page) -> None:
    """Do what the notebook says when done: set DONE = True in the last (clean-up) cell and run it."""
    last = select_cell(page, -1)
    page.evaluate(f"""index => {{
        const model = ({NOTEBOOK_JS}).content.widgets[index].model;
        model.sharedModel.setSource(model.sharedModel.getSource().replace('DONE = False', 'DONE = True'));
    }}""", last)
    run_cells(page, "notebook:run-cell", upto=None)
    errors = page.evaluate(ERRORS_JS)
    assert not errors, errors
