"""Run every notebook in a real JupyterLab, in headless Chromium, the way a learner would.

``make lab-check`` runs this with the repository's ``.venv/bin/python``. It

1. installs what it needs when missing: the system Chromium (``apt-get install chromium``, only
   when root) and the ``playwright`` Python client into the running venv (its own browser
   download is not used: ``LAB_CHECK_CHROMIUM`` or the first ``chromium`` on ``PATH`` is);
2. copies the repository's tracked files (``git ls-files``) into a temporary folder, so no
   notebook in the repository is ever modified, and starts JupyterLab there as ``make lab``
   does (``msstore up``, the exports of ``msstore env``, ``msstore._lab.lab_command`` — or
   ``jupyter lab`` in ``notebooks/`` where msstore has no ``msstore lab``),
   with ``MSSTORE_HOME`` pointing at the repository's server state, ``--allow-root`` when root,
   a free port, a random token and an isolated Jupyter config/data/runtime folder;
3. opens each notebook, runs "Restart Kernel and Run All Cells" (``notebook:restart-run-all``,
   accepting its dialog), waits until the kernel is idle and every code cell has run, and fails
   the notebook when any output is an error or a ``stderr`` stream, or a cell did not run;
   a screenshot of the top and of the end of each notebook goes to ``build/lab-check/``;
4. prints one line per notebook and ``N passed, M failed``; the exit status is 1 on failure.

Options: ``--timeout SECONDS`` per notebook (``LAB_CHECK_TIMEOUT``, default 600), ``--keep``
(keep the temporary copy and JupyterLab's log), notebook names or globs to run only those.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv that runs this script (make: .venv/bin)
PLAYWRIGHT_REQ = "playwright>=1.45"


def log(msg: str) -> None:
    print(msg, flush=True)


# -- 1. what the check needs ---------------------------------------------------------------


def find_chromium() -> str | None:
    env = os.environ.get("LAB_CHECK_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    path = find_chromium()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(
            "lab-check: no Chromium found. Install it (Debian/Ubuntu: apt-get install chromium) "
            "or set LAB_CHECK_CHROMIUM to a Chromium/Chrome executable."
        )
    log("lab-check: installing chromium with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    path = find_chromium()
    if not path:
        sys.exit("lab-check: apt-get installed chromium but no chromium is on PATH")
    return path


def ensure_playwright() -> None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        log(f"lab-check: installing {PLAYWRIGHT_REQ} into {BIN.parent} ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", PLAYWRIGHT_REQ], check=True
        )


# -- 2. a copy of the repository and JupyterLab on it --------------------------------------


def copy_tracked(repo: Path, dest: Path) -> int:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout
    n = 0
    for rel in filter(None, out.decode().split("\0")):
        src = repo / rel
        if not src.is_file():  # deleted in the work tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        n += 1
    return n


def server_env(repo: Path) -> dict[str, str]:
    """``make lab``'s environment: ``msstore up``, then the exports of ``msstore env``."""
    env = dict(os.environ)
    # The copy has its own pyproject.toml, so without this msstore.services.state_home() would
    # resolve to <copy>/.msstore and start a second pair of servers there.
    env.setdefault("MSSTORE_HOME", str(repo / ".msstore"))
    subprocess.run(
        [str(BIN / "msstore"), "up"], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL
    )
    out = subprocess.run(
        [str(BIN / "msstore"), "env"], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_lab(
    copy: Path, env: dict[str, str], logfile: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    port, token = free_port(), secrets.token_hex(16)
    jupyter_home = copy.parent / "jupyter"
    # No "get notified about official Jupyter news?" toast over the screenshots.
    settings = jupyter_home / "config/lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {
        **env,
        # Isolated from the user's ~/.jupyter and ~/.local/share/jupyter: no saved workspace
        # reopens other notebooks, no user kernelspec shadows the venv's python3.
        "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"),
        "JUPYTER_DATA_DIR": str(jupyter_home / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter_home / "runtime"),
        "PYTHONUNBUFFERED": "1",
    }
    try:  # exactly what `make lab` (`msstore lab notebooks`) runs, where msstore has it
        from msstore._lab import lab_command

        cmd = lab_command(copy / "notebooks", port)
    except ImportError:  # older msstore: the README's `jupyter lab` in notebooks/
        cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
        cmd += ["--ServerApp.port_retries=0"] + (["--allow-root"] if os.geteuid() == 0 else [])
    cmd += [
        f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to drive it
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0 and "--allow-root" not in cmd:
        sys.exit(f"lab-check: as root, JupyterLab needs --allow-root: {' '.join(cmd)}")
    out = logfile.open("wb")
    proc = subprocess.Popen(
        cmd,
        cwd=copy / "notebooks",
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(
                f"lab-check: jupyter lab exited with {proc.returncode}:\n"
                + logfile.read_text(errors="replace")[-3000:]
            )
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            sys.exit(
                "lab-check: jupyter lab did not answer within 120 s:\n"
                + logfile.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.5)
    with urllib.request.urlopen(f"{base}/api/kernelspecs?token={token}", timeout=5) as r:
        specs = json.load(r)
    spec = specs["kernelspecs"].get(specs["default"], {}).get("spec", {})
    log(f"lab-check: {' '.join(cmd[:-4])} ...")
    log(
        f"lab-check: JupyterLab at {base}/lab, kernel {specs['default']}: "
        f"{' '.join(spec.get('argv', [])[:1])}"
    )
    return proc, base, token


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: jupyter and its kernels
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- 3. drive JupyterLab -------------------------------------------------------------------

# Runs in the page. window.jupyterapp exists because of --LabApp.expose_app_in_browser.
JS_OPEN = """async (path) => {
  const app = window.jupyterapp;
  const w = await app.commands.execute('docmanager:open',
                                       {path, factory: 'Notebook', kernel: {name: 'python3'}});
  await w.context.ready;
  await w.sessionContext.ready;
  // A restart sent while the new kernel is still starting can leave it "starting" for good.
  const t0 = Date.now();
  while (w.sessionContext.kernelDisplayStatus !== 'idle') {
    if (Date.now() - t0 > 120000)
      throw new Error('kernel not idle 120 s after opening: '
                      + w.sessionContext.kernelDisplayStatus);
    await new Promise((r) => setTimeout(r, 200));
  }
  window.__lab = {w, statuses: []};
  w.sessionContext.statusChanged.connect((_, s) => window.__lab.statuses.push(s));
  app.shell.activateById(w.id);
  app.shell.collapseLeft();
  return w.content.widgets.length;
}"""

JS_STATE = """() => {
  const {w, statuses} = window.__lab;
  const cells = w.content.widgets.map((c, i) => {
    const m = c.model;
    if (m.type !== 'code') return {i, type: m.type};
    return {i, type: 'code', count: m.executionCount, state: m.executionState ?? null,
            outputs: m.outputs.toJSON()};
  });
  return {status: w.sessionContext.kernelDisplayStatus, statuses, cells};
}"""

JS_SCROLL = """async (where) => {
  const nb = window.__lab.w.content;
  const i = where === 'end' ? nb.widgets.length - 1 : where === 'top' ? 0 : where;
  nb.activeCellIndex = i;
  await nb.scrollToItem(i, 'center');
}"""

JS_CLOSE = """async () => {
  const {w} = window.__lab;
  w.context.model.dirty = false;  // a temporary copy: nothing to save, no "save?" dialog
  await w.sessionContext.shutdown();
  w.dispose();
}"""


def problems(state: dict[str, Any]) -> list[str]:
    found = []
    for cell in state["cells"]:
        if cell["type"] != "code":
            continue
        where = f"cell {cell['i']} [{cell['count'] if cell['count'] is not None else ' '}]"
        for out in cell["outputs"]:
            kind = out.get("output_type")
            if kind == "error":
                tb = "\n".join(out.get("traceback") or [])
                found.append(
                    f"{where}: error {out.get('ename')}: {out.get('evalue')}\n"
                    + strip_ansi(tb).rstrip()
                )
            elif kind == "stream" and out.get("name") == "stderr":
                text = out.get("text")
                text = "".join(text) if isinstance(text, list) else str(text)
                found.append(f"{where}: stderr:\n{text.rstrip()}")
    return found


def first_bad_cell(state: dict[str, Any]) -> int | None:
    for cell in state["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" or out.get("name") == "stderr":
                return int(cell["i"])
    return None


def strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def quiet(state: dict[str, Any]) -> bool:
    """The kernel restarted, is idle, and no cell is running or queued."""
    code = [c for c in state["cells"] if c["type"] == "code"]
    if state["status"] != "idle" or any(c["state"] == "running" for c in code):
        return False
    return "restarting" in state["statuses"] or "starting" in state["statuses"]


def finished(state: dict[str, Any]) -> bool:
    code = [c for c in state["cells"] if c["type"] == "code"]
    ran_all = all(c["count"] is not None for c in code)
    failed = any(o.get("output_type") == "error" for c in code for o in c["outputs"])
    return ran_all or failed  # JupyterLab stops "run all" at the first error


def settled(state: dict[str, Any], stable: int) -> bool:
    """Done: every cell ran or one failed (idle 1.5 s), or idle with nothing queued for 5 s."""
    if stable >= 10:  # e.g. the kernel died and was restarted: the remaining cells never run
        return True
    return stable >= 3 and finished(state)


def run_notebook(page: Any, name: str, timeout: float, shots: Path) -> tuple[bool, str, str]:
    page.evaluate(JS_OPEN, name)
    # A fresh run: no output, no count from the saved file may pass for one from this run.
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate(
        "() => { window.__lab.statuses.length = 0;"
        " window.jupyterapp.commands.execute('notebook:restart-run-all'); }"
    )
    accept = page.locator('.jp-Dialog:has-text("Restart") .jp-Dialog-button.jp-mod-accept')
    accept.wait_for(timeout=30_000)
    accept.click()
    deadline = time.monotonic() + timeout
    stable, alive, stuck, died = 0, time.monotonic(), "", None
    while True:
        state = page.evaluate(JS_STATE)
        stable = stable + 1 if quiet(state) else 0
        if settled(state, stable):  # idle several polls in a row: not the gap between two cells
            break
        if died is None and {"autorestarting", "dead"} & set(state["statuses"]):
            died = time.monotonic()  # "The kernel appears to have died. It will restart ..."
        if died is not None and time.monotonic() - died > 5:
            stuck = "the kernel died (JupyterLab restarted it)"
            break
        if state["status"] in ("idle", "busy"):
            alive = time.monotonic()
        elif time.monotonic() - alive > 120:  # dead, or starting/restarting/unknown for 2 min
            stuck = f"kernel {state['status']} for 120 s"
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    page.evaluate(JS_SCROLL, "top")
    page.wait_for_timeout(500)
    stem = Path(name).stem
    page.screenshot(path=str(shots / f"{stem}.png"))
    page.evaluate(JS_SCROLL, "end")
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / f"{stem}-end.png"))
    bad = first_bad_cell(state)
    if bad is not None:  # the first cell with an error or stderr, as the learner sees it
        page.evaluate(JS_SCROLL, bad)
        page.wait_for_timeout(800)
        page.screenshot(path=str(shots / f"{stem}-cell{bad}.png"))
    for _ in range(5):  # e.g. "Kernel Restarting": it would block the next notebook
        if not page.locator(".jp-Dialog").count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    found = problems(state)
    code = [c for c in state["cells"] if c["type"] == "code"]
    not_run = [c["i"] for c in code if c["count"] is None]
    if stuck:
        found.append(
            stuck + (f"; {len(not_run)} of {len(code)} code cells not run" if not_run else "")
        )
    elif not found and not_run:
        if time.monotonic() > deadline:
            found.append(
                f"timed out after {timeout:.0f} s; kernel {state['status']}, "
                f"{len(not_run)} of {len(code)} code cells not run (first: cell "
                f"{not_run[0]})"
            )
        else:
            found.append(
                f"kernel {state['status']}; {len(not_run)} of {len(code)} code cells "
                f"not run (first: cell {not_run[0]})"
            )
    elif found and not_run:
        found.append(f"{len(not_run)} of {len(code)} code cells not run after it")
    page.evaluate(JS_CLOSE)
    images = sum(
        any(k.startswith("image/") for k in o.get("data", {})) for c in code for o in c["outputs"]
    )
    ran = f"{len(code) - len(not_run)}/{len(code)} code cells ran, {images} images"
    return not found, ran, "\n".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names or globs (default: all)")
    parser.add_argument(
        "--timeout", type=float, default=float(os.environ.get("LAB_CHECK_TIMEOUT", "600"))
    )
    parser.add_argument("--screenshots", type=Path, default=REPO / "build" / "lab-check")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    t0 = time.monotonic()
    chromium = ensure_chromium()
    ensure_playwright()
    from playwright.sync_api import sync_playwright

    names = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        names = [
            n
            for n in names
            if any(fnmatch.fnmatch(n, g) or n.startswith(g) for g in args.notebooks)
        ]
    if not names:
        sys.exit("lab-check: no notebook matches")
    shots = args.screenshots.resolve()
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)

    tmp = Path(tempfile.mkdtemp(prefix="msstore-lab-check-"))
    copy = tmp / "repo"
    n = copy_tracked(REPO, copy)
    env = server_env(REPO)
    log(f"lab-check: {n} tracked files copied to {copy}; servers of {env['MSSTORE_HOME']}")
    lab, base, token = start_lab(copy, env, tmp / "jupyterlab.log")
    results: list[tuple[str, bool]] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=["--disable-dev-shm-usage", "--disable-gpu"],
            )
            log(f"lab-check: {chromium} {browser.version}")
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(f"{base}/lab?token={token}")
            page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.commands"
                " .hasCommand('notebook:restart-run-all')",
                timeout=120_000,
            )
            page.evaluate("() => window.jupyterapp.restored")
            for name in names:
                start = time.monotonic()
                try:
                    ok, ran, detail = run_notebook(page, name, args.timeout, shots)
                except Exception as exc:  # the page, not the notebook, went wrong
                    ok, ran, detail = False, "", f"lab-check could not drive the page: {exc}"
                    try:
                        page.screenshot(path=str(shots / f"{Path(name).stem}-failure.png"))
                    except Exception:
                        pass
                took = time.monotonic() - start
                log(f"{'ok  ' if ok else 'FAIL'}  {name:<34} {took:6.1f}s  {ran}")
                if detail:
                    log(textwrap.indent(detail.rstrip(), "      "))
                results.append((name, ok))
            if page_errors:
                log(
                    "lab-check: JavaScript errors in the page (not counted):\n  "
                    + "\n  ".join(page_errors[:10])
                )
            browser.close()
    finally:
        stop(lab)
        if args.keep:
            log(f"lab-check: kept {tmp} (JupyterLab log: {tmp / 'jupyterlab.log'})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    passed = sum(ok for _, ok in results)
    log(f"lab-check: {time.monotonic() - t0:.0f} s; screenshots in {shots}")
    log(f"{passed} passed, {len(results) - passed} failed")  # alone on its line: CI reads it
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
