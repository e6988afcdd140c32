"""The web demo in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium) loads the page, picks an example clip, asks, and reads the model's
answer. A screenshot is kept in $SPEECHLM_TEST_ARTIFACTS (default test-artifacts/)."""

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the serve extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from speechlm.inference.speech_lm import GenerationOptions  # noqa: E402
from speechlm.inference.tasks import TaskPrompt, task_instruction  # noqa: E402
from speechlm.serving.app import ServerConfig, create_app  # noqa: E402
from speechlm.serving.audio import decode_audio  # noqa: E402
from speechlm.serving.engines import Job, load_engine  # noqa: E402
from speechlm.serving.protocol import ServeLimits  # noqa: E402
from speechlm.serving.server import BackgroundServer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("SPEECHLM_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromedriver not found "
                       "(Debian: apt-get install -y chromium chromium-driver; .ci/run does)"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))


def _wait(condition, timeout=120, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_web_demo_answers_an_example_clip_in_chromium(tiny_speech_lm, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))  # examples spoken afresh
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    limits = ServeLimits(default_max_tokens=8)
    engine = load_engine(tiny_speech_lm, device="cpu")
    app = create_app(engine, ServerConfig("tiny-speech-lm", limits=limits,
                                          work_dir=tmp_path / "work"))
    examples = sorted((tmp_path / "work" / "examples").glob("*.wav"))
    assert len(examples) == 3
    # what the model says about the first example, asked directly
    instruction = task_instruction(TaskPrompt("asr"))
    wave = decode_audio(examples[0].read_bytes(), "example", limits.audio, engine.sample_rate)
    [expected] = engine.run([Job([wave], TaskPrompt("chat", question=instruction),
                                 GenerationOptions(max_new_tokens=8))])
    assert expected.text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(app) as server:
        browser = _browser()
        try:
            browser.get(f"{server.url}/")  # redirects to /web/
            _wait(lambda: browser.find_elements(By.ID, "ask"), what="the Ask button")
            label = _wait(lambda: [e for e in browser.find_elements(
                By.XPATH, "//body//*[not(self::script)][contains(text(), 'Clip 1:')]")
                if e.is_displayed()], what="the example clips")[0]
            label.click()
            _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#audio audio, #audio "
                                                "[data-testid='waveform-controls'], #audio "
                                                "button[aria-label*='Play' i]"),
                  what="the example clip in the audio box")
            browser.find_element(By.ID, "ask").click()
            answer_box = browser.find_element(By.CSS_SELECTOR, "#answer textarea")
            answer = _wait(lambda: answer_box.get_attribute("value"), what="the answer")
            browser.save_screenshot(str(ARTIFACTS / "web_demo.png"))
        finally:
            browser.quit()
    assert answer == expected.text
    assert (ARTIFACTS / "web_demo.png").stat().st_size > 10_000
