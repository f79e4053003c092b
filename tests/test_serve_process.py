"""owl-serve as a process and through a browser: SIGTERM stops taking requests and finishes
the streams in flight (then the process exits 0); the chat page in headless Chromium (Debian's
chromium + chromium-driver, installed here when missing) attaches an image, sends a question
and shows the streamed answer, which is what the offline pipeline answers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image

import owl_jax
from owl_jax import families
from owl_jax.checkpoint import save_checkpoint
from owl_jax.generate.slots import SlotEngine
from owl_jax.serve.app import ServeOptions, create_app
from owl_jax.serve.background import BackgroundServer, free_port
from owl_jax.serve.scheduler import Scheduler
from owl_jax.testing.models import FAST, random_params
from owl_jax.testing.spm import train_tiny_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_process")]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _checkpoint(tmp_path_factory, name):
    tok = str(tmp_path_factory.mktemp("tok"))
    train_tiny_tokenizer(tok, vocab_size=384)
    cfg = families.get(name).tiny(vocab_size=384, num_key_value_heads=2)
    path = str(tmp_path_factory.mktemp(name))
    save_checkpoint(path, random_params(cfg, seed=1), cfg, tokenizer_dir=tok)
    return path


def test_sigterm_finishes_the_streams_in_flight(tmp_path_factory):
    ckpt = _checkpoint(tmp_path_factory, "owl1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "owl_jax.cli.serve", "--ckpt", ckpt, "--port", str(port),
         "--fast-compile", "--slots", "2", "--steps-per-call", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        results, started = [None] * 6, threading.Semaphore(0)

        def stream(i):
            body = {"messages": [{"role": "user", "content": f"Question {i}"}],
                    "max_tokens": 120, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            lines = []
            with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                              timeout=240) as r:
                started.release()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
            results[i] = lines
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for _ in threads:  # every stream has its response headers: all are in flight
            assert started.acquire(timeout=240)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new requests once SIGTERM arrived
            httpx.post(url + "/v1/chat/completions", timeout=10,
                       json={"messages": [{"role": "user", "content": "late"}]})
        for t in threads:
            t.join(240)
        for lines in results:  # every stream in flight was finished, not cut
            assert lines[-1] == "[DONE]"
            usage = json.loads(lines[-2])["usage"]
            final = json.loads(lines[-3])["choices"][0]
            assert final["finish_reason"] in ("stop", "length")
            assert final["finish_reason"] == "stop" or usage["completion_tokens"] == 120
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _chromedriver():
    """Debian's chromium-driver (`make test` installs it; here too when missing, as root with
    apt-get: ~30 s). Skipped only where it cannot be installed."""
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        if not (shutil.which("apt-get") and os.geteuid() == 0):
            pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y "
                        "chromium chromium-driver, as root)")
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(install, capture_output=True, timeout=900, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
            out = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
            assert out.returncode == 0, f"apt-get install chromium failed:\n{out.stderr[-2000:]}"
    return CHROMEDRIVER


class _PacedEngine(SlotEngine):
    """Steps of at least 50 ms, so that the answer's chunks reach the page one by one."""

    def step(self):
        time.sleep(0.05)
        return super().step()


def test_chat_page_in_a_headless_browser(tmp_path_factory, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver_path = _chromedriver()
    owl = owl_jax.load_pretrained(_checkpoint(tmp_path_factory, "llava"),
                                  compiler_options=FAST)
    engine = _PacedEngine(owl.generator, slots=2, steps_per_call=1)
    engine.warmup()
    app = create_app(owl, Scheduler(engine), ServeOptions(model_name="tiny-llava"))
    image = tmp_path / "photo.png"
    rgb = np.random.default_rng(4).integers(0, 256, (26, 33, 3), np.uint8)
    Image.fromarray(rgb).save(image)
    question = "What is in the photo?"
    want = owl.generate(owl.family.build_prompt(question, 1), [Image.open(image)],
                        max_new_tokens=12, self_draft_tokens=0).text
    assert want
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with BackgroundServer(app) as server:
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            wait = WebDriverWait(browser, 120)
            browser.get(server.url + "/")
            wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny-llava")
            browser.find_element(By.ID, "images").send_keys(str(image))
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#thumbs img"))
            tokens = browser.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("12")
            # count the answer's updates as they stream in
            browser.execute_script("""
                window.updates = 0;
                new MutationObserver(() => { window.updates += 1; })
                  .observe(document.getElementById('log'),
                           {subtree: true, childList: true, characterData: true});""")
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(("done",
                                                                                   "error")))
            assert browser.find_element(By.ID, "status").text in ("done (length)",
                                                                  "done (stop)")
            answer = browser.find_element(By.CSS_SELECTOR, ".assistant .text").text
            user_imgs = browser.find_elements(By.CSS_SELECTOR, ".user img")
            updates = browser.execute_script("return window.updates")
        finally:
            browser.quit()
    assert len(user_imgs) == 1
    # the page shows text as the browser renders it (runs of spaces and ends trimmed)
    assert answer == " ".join(want.split()) or answer == want.strip()
    assert updates >= 6  # the user bubble, the empty answer, then the answer as it grows
