"""Train a testbed model until it diverges, then explain it with the post-mortem.

    python examples/postmortem_demo.py runs/postmortem_demo            # train + text report + HTML
    python examples/postmortem_demo.py runs/postmortem_demo --screenshot docs/postmortem.png

A multitask ranking model (testbed "Small" at 1/32 scale, six tasks) is trained
sequentially (paper 5.1.2) with Adagrad and no clipping; the learning rate jumps
from 0.05 to 20 after step 90 -- "increasing the learning rate can significantly
increase the likelihood of loss divergence" (paper 2.2 (3)) -- and the loss
fully diverges.  Then::

    clippy-monitor postmortem RUN --html RUN/postmortem.html

``--screenshot`` opens the HTML offline in headless Chromium (selenium) and saves
the top of the page as a PNG (the one in docs/ for the README).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train(logdir: Path) -> None:
    import keras

    from clippy_monitor.monitor import DetectorConfig
    from clippy_monitor.testbed import SyntheticConfig, SyntheticLog, build_model, compile_model
    from clippy_monitor.testbed.protocol import ProtocolConfig, train_sequentially

    keras.utils.set_random_seed(0)
    log = SyntheticLog(
        SyntheticConfig(
            num_days=5,
            rows_per_day=1024,
            n_dense=16,
            n_categorical=4,
            vocab_size=50,
            shift_days=(),
            seed=0,
        )
    )
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([90], [0.05, 20.0])
    model = compile_model(
        build_model("Small", log.features, log.tasks, scale=1 / 32),
        log.tasks,
        keras.optimizers.Adagrad(lr),
    )
    result = train_sequentially(
        model,
        log,
        ProtocolConfig(batch_size=64, steps_per_day=40, evals_per_day=1, eval_rows=256),
        logdir,
        detector=DetectorConfig(warmup_steps=20, baseline_decay=0.9, recovery_window=30),
    )
    print(f"trained {result.steps} steps in {result.wall_s:.0f} s; events: {result.events}")


def screenshot(page: Path, png: Path, width: int = 1300, height: int = 2250) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--hide-scrollbars",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(page.resolve().as_uri())
            WebDriverWait(driver, 60).until(
                lambda d: d.execute_script(
                    "return document.querySelectorAll('.js-plotly-plot').length"
                    " === document.querySelectorAll('div.plot').length"
                )
            )
            time.sleep(1.0)
            driver.save_screenshot(str(png))
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--screenshot", type=Path, metavar="PNG")
    args = parser.parse_args(argv)
    if not (args.logdir / "clippy_meta.json").exists():
        train(args.logdir)
    from clippy_monitor.cli import main as cli

    page = args.logdir / "postmortem.html"
    code = cli(["postmortem", str(args.logdir), "--html", str(page)])
    if args.screenshot is not None:
        screenshot(page, args.screenshot)
        print(f"screenshot: {args.screenshot}")
    return code


if __name__ == "__main__":
    sys.exit(main())
