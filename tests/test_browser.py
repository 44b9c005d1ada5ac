"""The notebooks in a real JupyterLab, driven through Debian's Chromium with Playwright (tests/jupyterlab_driver.py).

JupyterLab runs on 127.0.0.1 with token auth, in a temporary root holding copies of the notebooks. The
browser opens 02-prompt-playground, runs it, types a multi-line prompt into the Playground, clicks
Generate, watches the streamed text grow and clicks Stop; then opens View code and selects the command line,
saves a preset to a YAML file and loads it back, and runs compare mode; then opens 05-tokenizer-quirks, runs
it and checks the coloured token spans and the flagged `<n>`. Run > Run All Cells on 02 and 03 must leave the
Playground and FewShot on screen; on 08 it must draw the logit-lens grid and the attention heatmap.
Screenshots go to artifacts/browser/; no widget label, button or drop-down text in them may be cut off
(checked in the page, not only by eye).

Needs /usr/bin/chromium (`apt-get install chromium`) and the playwright package; never downloads a browser.
Skipped without them, except under CI (the CI variable set), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from glmkit.parallel.comm import free_port

from jupyterlab_driver import (ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, CLIPPED_JS, LAB_SETTINGS, LAB_START_S, WAIT_MS, Lab,
                               assert_no_clipped_labels, browser_missing, clean_up, http_status, labelled_input,
                               process_tree, run_cells, select_cell, set_field, shot)
from test_notebooks import NOTEBOOKS, end_processes, write_kernelspec

MULTILINE_PROMPT = "Question: what does this function do?\ndef add(a, b):\n    return a + b\nAnswer:"


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {missing}", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free loopback port with a random token; always stopped, with every process it started."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    for notebook in NOTEBOOKS:
        shutil.copy(notebook, root / notebook.name)
    config_dir = tmp / "config"
    for name, values in LAB_SETTINGS.items():
        path = config_dir / "lab" / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, **write_kernelspec(tmp / "jupyter"), "JUPYTER_CONFIG_DIR": str(config_dir),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces")}
    token, port = secrets.token_hex(24), free_port()
    log = tmp / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
               "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:  # CI runs as root
        command.append("--allow-root")
    with open(log, "wb") as log_file:
        server = subprocess.Popen(command, env=env, cwd=root, stdout=log_file, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    started: set[psutil.Process] = set()
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + LAB_START_S
        while http_status(f"{lab.url}/api/status?token={token}") != 200:
            assert server.poll() is None, f"JupyterLab exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"JupyterLab did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert http_status(f"{lab.url}/api/status") == 403, "JupyterLab answered without the token"
        yield lab
    finally:
        started = process_tree(server.pid)
        try:
            lab.shutdown_kernels()
        except Exception:  # noqa: BLE001 - the server may be gone already; processes are ended below
            pass
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        started |= process_tree(server.pid)
        left = end_processes(started)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "jupyterlab.log")
        assert not left, f"processes outlived JupyterLab (killed now): {left}"


@pytest.fixture
def page(browser, lab, request):
    """A fresh browser page; on a failure its last state is saved as a screenshot, and always its console."""
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    failed_before = request.session.testsfailed
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = request.node.name
        if request.session.testsfailed > failed_before:
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"))
        (ARTIFACTS / f"{name}-console.log").write_text("\n".join(console))
        context.close()
        lab.shutdown_kernels()


def use_view_code_presets_and_compare(page, root, lab) -> None:
    """View code, a preset saved to YAML and loaded back, and compare mode, in the Playground of notebook 02."""
    from playwright.sync_api import expect

    set_field(root, "min new tokens", "0")
    set_field(root, "max new tokens", "7")
    cli = root.locator(".glmkit-code textarea").nth(1)
    if not cli.is_visible():  # notebook 02 may have opened it already from code
        root.get_by_role("button", name="View code").click()
    expect(cli).to_be_visible(timeout=WAIT_MS)
    expect(cli).to_have_value(re.compile(r"^glmkit generate \$'Question: what does this function do\?\\n"
                                         r".*--max-new-tokens 7"), timeout=WAIT_MS)
    python = root.locator(".glmkit-code textarea").first
    expect(python).to_have_value(re.compile(r"GLMCluster\(config='glm-tiny'.*cluster\.generate\(", re.S))
    cli.click()
    page.keyboard.press("Control+A")  # the whole line is selected, ready to copy
    selected = cli.evaluate("el => el.value.substring(el.selectionStart, el.selectionEnd)")
    assert selected == cli.input_value() and selected.startswith("glmkit generate")
    cli.scroll_into_view_if_needed()
    shot(page, "02-playground-view-code")
    assert_no_clipped_labels(root)
    root.get_by_role("button", name="View code").click()  # fold it away again

    presets = lab.root / "browser-presets.yaml"
    set_field(root, "presets file", str(presets))
    set_field(root, "preset", "browser-7")
    root.get_by_role("button", name="Save preset").click()
    expect(root).to_contain_text("saved preset 'browser-7'", timeout=WAIT_MS)
    assert "max_new_tokens: 7" in presets.read_text()
    set_field(root, "max new tokens", "4")
    root.get_by_role("button", name="Load preset").click()
    expect(root).to_contain_text("loaded preset 'browser-7'", timeout=WAIT_MS)
    expect(labelled_input(root, "max new tokens")).to_have_value("7")

    # Compare: A greedy for 4 tokens, B the preset (greedy for 7) on the same model.
    set_field(root, "max new tokens", "4")
    root.get_by_role("checkbox", name="compare", exact=True).check()
    b_settings = root.locator(".widget-inline-hbox", has=page.locator("label.widget-label",
                                                                     has_text=re.compile("^B settings$")))
    b_settings.locator("select").select_option(label="browser-7")
    root.get_by_role("button", name="Generate").click()
    line = root.locator(".widget-html-content", has_text=re.compile("first divergence at generated|identical:"))
    expect(line).to_be_visible(timeout=WAIT_MS)
    expect(root.get_by_role("button", name="Generate")).to_be_enabled(timeout=WAIT_MS)
    text = line.inner_text()
    if text.startswith("first divergence"):
        assert text.startswith("first divergence at generated token #4: A (ended)"), text
        expect(root.locator("[data-diverges='true']")).to_have_count(1)
    line.scroll_into_view_if_needed()
    shot(page, "02-playground-compare")
    assert_no_clipped_labels(root)
    root.get_by_role("checkbox", name="compare", exact=True).uncheck()


def test_playground_streams_and_stops_in_jupyterlab(lab, page):
    from playwright.sync_api import expect

    lab.open(page, "02-prompt-playground.ipynb")
    # Everything but the last cell, which closes the cluster: the playground must stay alive to be used.
    last = select_cell(page, -1)
    run_cells(page, "notebook:run-all-above", upto=last)
    prompt_box = page.locator("textarea[placeholder^='Prompt. Use [MASK]']")
    expect(prompt_box).to_be_visible(timeout=WAIT_MS)
    root = page.locator(".jp-OutputArea-output", has=prompt_box)
    root.scroll_into_view_if_needed()
    count_line = root.locator(".widget-html-content", has_text="prompt tokens")
    before = count_line.inner_text()

    # Type like a person: select what is there, type three lines (Enter makes the newlines).
    prompt_box.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    prompt_box.press_sequentially(MULTILINE_PROMPT, delay=5)
    expect(prompt_box).to_have_value(MULTILINE_PROMPT)
    expect(count_line).not_to_have_text(before, timeout=WAIT_MS)  # the kernel saw the new prompt
    for label in ("max new tokens", "min new tokens"):  # long enough to watch it stream, and to stop it
        field = labelled_input(root, label)
        field.fill("400")
        field.press("Tab")
    shot(page, "02-playground-prompt")

    root.get_by_role("button", name="Generate").click()
    stop = root.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled(timeout=WAIT_MS)
    blank = root.locator(".glmkit-blank")  # re-rendered as text streams in: always query afresh
    expect(blank).to_have_text(re.compile(r"[^▌\s]"), timeout=WAIT_MS)
    lengths = [len(blank.inner_text())]
    for _ in range(6):
        time.sleep(0.5)
        lengths.append(len(blank.inner_text()))
    status = root.locator(".widget-html-content", has_text="generating")
    status.scroll_into_view_if_needed()
    shot(page, "02-playground-streaming")
    assert lengths[-1] > lengths[0], f"the streamed text did not grow: {lengths}"

    stop.click()
    expect(root).to_contain_text("finish reason: abort", timeout=WAIT_MS)
    expect(stop).to_be_disabled()
    expect(root.get_by_role("button", name="Generate")).to_be_enabled()
    output = root.locator(".widget-html-content", has=page.locator(".glmkit-blank")).inner_text()
    assert "return a + b" in output and "Answer:" in output  # the typed prompt, around the generated text
    root.locator(".widget-html-content", has_text="finish reason: abort").scroll_into_view_if_needed()
    shot(page, "02-playground-stopped")
    use_view_code_presets_and_compare(page, root, lab)

    # Now the last cell: close the playground and the cluster.
    clean_up(page)


def test_tokenizer_quirks_render_coloured_tokens(lab, page):
    lab.open(page, "05-tokenizer-quirks.ipynb")
    run_cells(page, "notebook:run-all-cells", upto=None)
    tokens = page.locator("span.glmkit-token")
    tokens.first.wait_for(timeout=WAIT_MS)
    assert tokens.count() > 100
    # Neighbouring tokens alternate colours; bytes have dashed boxes, masks are red, the divergence outlined.
    assert page.locator("span.glmkit-token[style*='background:#dbeafe']").count() > 10
    assert page.locator("span.glmkit-token[style*='background:#fde68a']").count() > 10
    assert page.locator("span.glmkit-token[style*='dashed']").count() >= 8
    assert page.locator("span.glmkit-token[style*='background:#fca5a5']").count() >= 1
    assert page.locator("span.glmkit-token[style*='outline:2px solid']").count() >= 5
    colour = tokens.first.evaluate("el => getComputedStyle(el).backgroundColor")
    assert colour == "rgb(219, 234, 254)", colour  # #dbeafe, really painted
    box = tokens.first.bounding_box()
    assert box and box["width"] > 0 and box["height"] > 0

    first = page.locator(".jp-OutputArea-output", has=page.locator("span.glmkit-token")).first
    first.scroll_into_view_if_needed()
    shot(page, "05-tokenizer-trailing-space")
    emoji = page.locator(".jp-OutputArea-output", has=page.locator("span.glmkit-token[title*='0xF0']")).first
    emoji.scroll_into_view_if_needed()
    shot(page, "05-tokenizer-bytes", element=emoji)

    # A typed <n> (and <|tab|>, ▁) is underlined, and the inspector says what the model reads instead.
    flagged = page.locator(".jp-OutputArea-output", has=page.locator("span.glmkit-token[data-round-trip='no']"))
    flagged.first.scroll_into_view_if_needed()
    assert flagged.first.locator("span.glmkit-token[data-round-trip='no']").count() == 3
    assert "'<n>' (characters 6–9) is read as a newline" in flagged.first.inner_text()
    shot(page, "05-tokenizer-round-trip", element=flagged.first)
    selection = page.locator(".widget-html-content", has_text="selection 13–17")
    assert "4 characters · 1 tokens touch it" in selection.first.inner_text()
    assert_no_clipped_labels(flagged.first)

def test_run_all_leaves_the_playground_on_screen(lab, page):
    from playwright.sync_api import expect

    lab.open(page, "02-prompt-playground.ipynb")
    run_cells(page, "notebook:run-all-cells", upto=None)  # Run > Run All Cells, the clean-up cell included
    prompt_box = page.locator("textarea[placeholder^='Prompt. Use [MASK]']")
    expect(prompt_box).to_be_visible(timeout=WAIT_MS)
    root = page.locator(".jp-OutputArea-output", has=prompt_box)
    root.scroll_into_view_if_needed()
    expect(root.get_by_role("button", name="Generate")).to_be_enabled()
    expect(root.locator(".glmkit-blank").first).to_be_visible()  # the last run's output is still shown
    shot(page, "02-run-all-playground")
    clean_up(page)
    expect(page.locator("textarea[placeholder^='Prompt. Use [MASK]']")).to_have_count(0, timeout=WAIT_MS)


def test_run_all_leaves_fewshot_on_screen_with_no_clipped_labels(lab, page):
    from playwright.sync_api import expect

    lab.open(page, "03-few-shot.ipynb")
    run_cells(page, "notebook:run-all-cells", upto=None)
    queries = page.locator("textarea[placeholder^='queries, one per line']")
    expect(queries).to_be_visible(timeout=WAIT_MS)
    root = page.locator(".jp-OutputArea-output", has=queries)
    root.scroll_into_view_if_needed()
    expect(root.get_by_role("button", name="Run")).to_be_enabled()
    expect(root.locator("select").first).to_have_value("en-de-translation")  # not "(custom)"
    for label in ("instruction", "extra stops", "between examples", "mask after prefix"):
        expect(root.locator("label.widget-label", has_text=re.compile(f"^{re.escape(label)}$"))).to_be_visible()
    clipped = root.evaluate(CLIPPED_JS)
    assert not clipped, f"text cut off in the FewShot tool: {clipped}"
    root.locator("select").first.scroll_into_view_if_needed()  # the tool's top row, below the toolbar
    page.mouse.wheel(0, -120)
    shot(page, "03-run-all-fewshot")
    expect(root.locator("table")).to_contain_text("Haus")  # the notebook's Run filled the table (house -> Haus)

    # The en-python template, picked as a user would: its answers are code, not empty.
    root.locator("select").first.select_option("en-python")
    expect(root.locator("textarea").first).to_have_value("Write Python code for each English description.")
    queries.fill("reverse a list")
    root.get_by_role("button", name="Run").click()
    expect(root).to_contain_text("1 of 1 queries answered", timeout=WAIT_MS)
    answer = root.locator("table tbody tr td").nth(1).inner_text()
    assert answer.strip(), "the en-python answer is empty"
    assert not root.evaluate(CLIPPED_JS)
    root.locator("table").scroll_into_view_if_needed()
    shot(page, "03-fewshot-en-python")
    clean_up(page)


def _lightness(rgb: str) -> int:
    return sum(int(x) for x in re.findall(r"\d+", rgb)[:3])


def test_inside_glm_draws_the_logit_lens_grid(lab, page):
    from playwright.sync_api import expect

    lab.open(page, "08-inside-glm.ipynb")
    run_cells(page, "notebook:run-all-cells", upto=None)
    grid = page.locator("table.glmkit-lens").first
    expect(grid).to_be_visible(timeout=WAIT_MS)
    root = page.locator(".jp-OutputArea-output", has=grid)
    cells = grid.locator("td.glmkit-lens-cell")
    layers = grid.locator("tbody tr").count()
    assert layers == 8 and cells.count() == layers * grid.locator("th.glmkit-lens-position").count()
    # Painted by probability: the likeliest cell is darker than the least likely; the top k is on hover.
    probs = [float(p) for p in cells.evaluate_all("cells => cells.map(c => c.dataset.prob)")]
    likeliest, unlikeliest = cells.nth(probs.index(max(probs))), cells.nth(probs.index(min(probs)))
    colour = "el => getComputedStyle(el).backgroundColor"
    assert _lightness(likeliest.evaluate(colour)) < _lightness(unlikeliest.evaluate(colour))
    title = likeliest.get_attribute("title")
    assert re.search(r"^ 1\. .*  p = \d\.\d{3}$", title, re.M) and len(title.splitlines()) == 6  # top 5
    box = likeliest.bounding_box()
    assert box and box["width"] > 10 and box["height"] > 10
    grid.scroll_into_view_if_needed()
    shot(page, "08-logit-lens", element=root)
    root.get_by_role("button", name="target rank").click()  # the target view, as a user switches to it
    expect(grid.locator("td.glmkit-lens-cell").first).to_have_text(re.compile(r"^#\d+$"), timeout=WAIT_MS)
    assert_no_clipped_labels(root)
    heatmap = page.locator("img.glmkit-attention")  # the attention view's PNG
    heatmap.scroll_into_view_if_needed()
    assert heatmap.evaluate("img => img.naturalWidth") > 200
    attention = page.locator(".jp-OutputArea-output", has=heatmap)
    assert_no_clipped_labels(attention)
    shot(page, "08-attention", element=attention)
