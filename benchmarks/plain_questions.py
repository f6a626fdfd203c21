"""The plain way of asking several questions about each image in a folder: one prompt at a time, the seeds' way
(the full prompt and the image through the processor, `generate`, decode), so every question pays for its image
again. Prints one JSON line per (image, question): image, prompt, text, new_tokens.

    python benchmarks/plain_questions.py CHECKPOINT IMAGE_DIR MAX_NEW_TOKENS QUESTION...
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

checkpoint, folder, max_new_tokens, questions = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
processor = AutoProcessor.from_pretrained(checkpoint)
model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
for path in sorted(folder.iterdir()):
    for question in questions:
        image = Image.open(path).convert("RGB")
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": question}]}],
                                               add_generation_prompt=True, tokenize=False)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, inputs.input_ids.shape[1]:]
        print(json.dumps({"image": str(path), "prompt": question, "new_tokens": int(new.numel()),
                          "text": processor.decode(new, skip_special_tokens=True).strip()}), flush=True)
