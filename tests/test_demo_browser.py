"""The Gradio demo in a real headless Chromium: upload a RealSR LR image, get two results (A/B) at scale x the input,
the PiSA-SR lambdas shown for a two-set checkpoint, a screenshot, and a broken file answered with the loader's reason.

Chromium and its driver are Debian's packages (``/usr/bin/chromium``, ``/usr/bin/chromedriver``), installed here by
apt-get when missing and running as root; Selenium is pointed at them, so it never downloads a browser. The screenshot
goes to ``$DEMO_SCREENSHOT`` when set, else to tmp_path; ``$DEMO_CKPT_A`` / ``$DEMO_CKPT_B`` replace the tiny
checkpoints (docs/images/demo.png is made that way, see docs/demo.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import TINY, compose_config
from osediff_lab.data.images import UnreadableImage, load_rgb
from osediff_lab.models.components import build_components
from osediff_lab.models.lora_files import export_lora
from osediff_lab.models.osediff import build_generator
from osediff_lab.models.pisasr import build_pisa_generator
from test_pipeline import perturb_trained

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
APT_PACKAGES = ("chromium", "chromium-driver")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
SERVE_TIMEOUT_S, RESULT_TIMEOUT_S = 300, 300


def apt_install_chromium() -> str | None:
    """Install Debian's Chromium and driver with apt-get when missing; None when present, else why they are not."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{CHROMIUM} / {CHROMEDRIVER} missing; install them as root: apt-get install -y {' '.join(APT_PACKAGES)}"
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *APT_PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}"
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium through Debian's chromedriver (skip with the reason if not installable)."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the demo extra is not installed: pip install -e '.[demo]'")
    problem = apt_install_chromium()
    if problem:
        pytest.skip(f"no headless Chromium: {problem}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def tiny_osediff_checkpoint(out: Path) -> Path:
    """A tiny OSEDiff export (random base rebuilt from the sidecar's seed, LoRA offset as training would)."""
    cfg = compose_config(TINY)
    torch.manual_seed(cfg.seed)
    generator, targets = build_generator(build_components(cfg.model), cfg.generator)
    perturb_trained(generator)
    state = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    return export_lora(state, cfg, targets, out / "osediff_lora.safetensors")[0]


def tiny_pisasr_checkpoint(out: Path) -> Path:
    """A tiny PiSA-SR export with both LoRA sets offset (its sidecar names the method: two sets at inference)."""
    cfg = compose_config([*TINY, "method=pisasr_semantic"])
    torch.manual_seed(cfg.seed)
    generator, targets = build_pisa_generator(build_components(cfg.model), cfg.method.lora, cfg.method.timestep)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in sorted(generator.named_parameters()):
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {n: p for n, p in generator.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    return export_lora(state, cfg, targets, out / "pisasr_lora.safetensors")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The demo served by its CLI (A: tiny OSEDiff, B: tiny PiSA-SR, on CPU) until the module's tests end."""
    root = tmp_path_factory.mktemp("demo")
    ckpt_a = os.environ.get("DEMO_CKPT_A") or tiny_osediff_checkpoint(root)
    ckpt_b = os.environ.get("DEMO_CKPT_B") or tiny_pisasr_checkpoint(root)
    port, log = free_port(), (root / "demo.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "osediff_lab.demo", f"ckpt={ckpt_a}", f"ckpt_b={ckpt_b}", f"port={port}",
                             "pipeline.device=cpu"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + SERVE_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited ({proc.returncode}):\n{(root / 'demo.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the demo did not serve {url} in {SERVE_TIMEOUT_S} s:\n{(root / 'demo.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def upload(driver, path: Path) -> None:
    driver.find_element("css selector", "#upload input[type=file]").send_keys(str(path))


def status_text(driver) -> str:
    return driver.find_element("css selector", "#status").text


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s waiting for {what}; status: {status_text(driver)!r}")


def slider_images(driver, name: str) -> list[tuple[int, int]]:
    """(naturalWidth, naturalHeight) of every loaded image in result ``name``'s slider."""
    return [tuple(size) for size in driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);",
        f"#result-{name}")]


def test_upload_gives_two_results_at_scale_and_a_broken_file_its_reason(browser, app_url, realsr, tmp_path):
    lr = sorted((realsr / "LR").glob("*.png"))[0]
    w, h = Image.open(lr).size
    browser.get(app_url)
    wait_for(browser, lambda d: d.find_elements("css selector", "#upload input[type=file]"), 60, "the page")
    if not os.environ.get("DEMO_CKPT_B"):  # the tiny PiSA-SR B has two LoRA sets: the lambdas are shown
        assert browser.find_element("css selector", "#lambda_sem").is_displayed()

    upload(browser, lr)
    wait_for(browser, lambda d: f"{w * 4}x{h * 4}" in status_text(d), 60, "the upload's sizes")
    browser.find_element("css selector", "#run").click()
    wait_for(browser, lambda d: all(len(slider_images(d, n)) >= 2 for n in "AB"), RESULT_TIMEOUT_S, "both results")
    for name in "AB":  # before (LQ enlarged to the SR size) and after, each scale x the input
        assert set(slider_images(browser, name)) == {(4 * w, 4 * h)}, name
        assert f"{4 * w}x{4 * h} px" in browser.find_element("css selector", f"#caption-{name}").text
    shot = Path(os.environ.get("DEMO_SCREENSHOT", tmp_path / "demo.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0

    broken = tmp_path / "broken.png"
    broken.write_bytes(lr.read_bytes()[:200])
    with pytest.raises(UnreadableImage) as refused:
        load_rgb(broken)
    browser.get(app_url)  # a fresh page: the upload box holds one file
    wait_for(browser, lambda d: d.find_elements("css selector", "#upload input[type=file]"), 60, "the page")
    upload(browser, broken)
    wait_for(browser, lambda d: refused.value.reason in status_text(d), 60, "the loader's reason")
    browser.find_element("css selector", "#run").click()
    wait_for(browser, lambda d: "Cannot read broken.png" in status_text(d) and not slider_images(d, "A"), 60,
             "the run's refusal")
    assert refused.value.reason in status_text(browser)
