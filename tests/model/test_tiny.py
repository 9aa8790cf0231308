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


def test_system_line_is_one_token_and_prompts_round_trip(tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor

    from llava_c_ray.data.template import SYSTEM, prompt_text

    tokenizer = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    prompt = prompt_text("Which object is on the left?\nAnswer with one word.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == SYSTEM
    assert SYSTEM not in tokenizer.convert_ids_to_tokens(ids[1:])
    assert tokenizer.decode(ids) == prompt
    alone = tokenizer("A chat between friends.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(alone) == "A chat between friends." and len(alone) > 1
