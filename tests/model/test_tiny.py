"""The tiny checkpoint is a real HF LLaVA: it loads in a fresh process and generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.new("RGB", (96, 96), "red")], text=[prompt], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
assert out.shape[1] > inputs["input_ids"].shape[1]
print("OK", type(processor).__name__)
"""


def test_loads_and_generates_in_a_fresh_process(tiny_checkpoint: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK LlavaProcessor" in done.stdout
