"""A conversation the plain way: every turn renders the whole history with the chat template, runs every image
of it through the processor and the whole prompt through the model (what llava chat did before it kept its
cache). Reads turns from stdin like `llava chat` piped (`/image PATH` attaches to the next turn) and prints one
JSON line per answer: text, seconds (that turn's).

    python benchmarks/plain_chat.py CHECKPOINT MAX_NEW_TOKENS FIRST_IMAGE < turns.txt
"""

import json
import sys
import time

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

checkpoint, max_new_tokens, first_image = sys.argv[1], int(sys.argv[2]), sys.argv[3]
processor = AutoProcessor.from_pretrained(checkpoint)
model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
messages, images, pending = [], [], [first_image]
for line in (line.strip() for line in sys.stdin if line.strip()):
    if line.startswith("/image "):
        pending.append(line.split(" ", 1)[1])
        continue
    start = time.perf_counter()
    messages.append({"role": "user", "content": [*({"type": "image"} for _ in pending), {"type": "text", "text": line}]})
    images += [Image.open(path).convert("RGB") for path in pending]
    pending = []
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    print(json.dumps({"text": text, "seconds": round(time.perf_counter() - start, 4)}), flush=True)
