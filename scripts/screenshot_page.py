"""Screenshot of the chat page with a conversation, taken by headless Chromium (docs/serving_page.png).

    python scripts/screenshot_page.py [--model_path DIR] [--output docs/serving_page.png]

Without --model_path it serves a tiny random model (so the replies are nonsense, but streamed and
rendered exactly as a trained model's would be). Needs chromium and chromium-driver (Debian).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["你好，蜜蜂！Say hello in **bold**, please.", "How many words are in: fox owl cup"]


def tiny_random_model(directory: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "bumblecore" / "demo_data" / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=1024,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(ROOT / "tests"))
    from serving import running_server  # tests/serving.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path")
    parser.add_argument("--output", default=str(ROOT / "docs" / "serving_page.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            model_path = str(Path(tmp) / "model")
            tiny_random_model(Path(model_path))
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,720", "--hide-scrollbars"):
            options.add_argument(flag)
        with running_server(model_path, max_batch_size=4) as url:
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
            try:
                wait = WebDriverWait(driver, 60)
                driver.get(url + "/")
                driver.find_element(By.ID, "system-prompt").send_keys("You are a friendly bee. 你是一只友好的蜜蜂。")
                for field, value in (("temperature", "0"), ("max-tokens", "48")):
                    element = driver.find_element(By.ID, field)
                    element.clear()
                    element.send_keys(value, Keys.TAB)
                for question in QUESTIONS:
                    driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
                    wait.until(
                        lambda d: (
                            len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) >= 1
                            and not d.find_elements(By.CSS_SELECTOR, ".message.streaming")
                        )
                    )
                    time.sleep(0.3)
                driver.find_element(By.ID, "input").send_keys("再问一个问题…")
                driver.save_screenshot(args.output)
            finally:
                driver.quit()
    print(f"wrote {args.output} ({Path(args.output).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
