"""The CUDA paths, on a machine with a GPU: `python -m pytest -m gpu` (skipped without CUDA, and left out of the
default run). The rest of the suite hides the GPUs; these tests run the tool and plain transformers in processes
that see them, and compare the answers the same way the CPU tests do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import EXAMPLES, REPO, gpu_environment

pytestmark = pytest.mark.gpu

IMAGES = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"]
RENDERED = "[INST] <image>\nDescribe this image in detail. [/INST]"


def llava_on_gpu(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "llavanext_cli", *map(str, args), "--format", "jsonl"],
                            capture_output=True, text=True, env=gpu_environment(), cwd=str(REPO), timeout=600)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def python_on_gpu(code: str) -> object:
    """Run `code` in a process that sees the GPUs; it prints one JSON value, returned here."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=gpu_environment(), cwd=str(REPO), timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def plain_transformers_on_gpu(checkpoint, max_new_tokens: int, **load: str) -> list[str]:
    """The seeds' way on the GPU, one image at a time, with `load` added to from_pretrained (as Python source)."""
    extra = "".join(f", {key}={value}" for key, value in load.items())
    return python_on_gpu(f"""
        import json, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
        from llavanext_cli.io.images import load_image
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r})
        model = AutoModelForImageTextToText.from_pretrained({str(checkpoint)!r}, device_map="cuda"{extra}).eval()
        answers = []
        for path in {[str(p) for p in IMAGES]!r}:
            inputs = processor(images=load_image(path), text={RENDERED!r}, return_tensors="pt").to("cuda")
            if inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
            answers.append(processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())
        print(json.dumps(answers))
    """)


def test_bfloat16_on_cuda_equals_plain_transformers(tiny_next):
    records = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--dtype", "bfloat16",
                           "--max-new-tokens", "8")
    assert [r["text"] for r in records] == plain_transformers_on_gpu(tiny_next, 8, dtype="torch.bfloat16")


def test_float32_batches_on_cuda_equal_plain_transformers(tiny_next):
    records = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--batch-size", "3",
                           "--max-new-tokens", "8")
    assert [r["text"] for r in records] == plain_transformers_on_gpu(tiny_next, 8, dtype="torch.float32")


@pytest.mark.parametrize("quant,config", [
    ("4bit", "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float16, "
             "llm_int8_skip_modules=['model.vision_tower', 'model.multi_modal_projector', 'lm_head'])"),
    ("8bit", "BitsAndBytesConfig(load_in_8bit=True, "
             "llm_int8_skip_modules=['model.vision_tower', 'model.multi_modal_projector', 'lm_head'])"),
])
def test_quantized_on_cuda(tiny_next, quant, config):
    quantized = python_on_gpu(f"""
        import json, torch
        from llavanext_cli.model.loading import LoadOptions, load_config, load_model, quantized_module_names
        model = load_model({str(tiny_next)!r}, load_config({str(tiny_next)!r}), LoadOptions(quant={quant!r},
                           dtype="float16", device="cuda"))
        names = set(quantized_module_names(model))
        language = {{name for name, module in model.named_modules()
                     if name.startswith("model.language_model") and isinstance(module, torch.nn.Linear)}}
        print(json.dumps([bool(names), names == language, str(model.device)]))
    """)
    assert quantized == [True, True, "cuda:0"]
    records = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--dtype", "float16",
                           "--quant", quant, "--max-new-tokens", "8")
    expected = plain_transformers_on_gpu(tiny_next, 8, dtype="torch.float16", quantization_config=config)
    assert [r["text"] for r in records] == expected


def test_sdpa_on_cuda_equals_plain_transformers(tiny_next):
    records = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--attn", "sdpa",
                           "--max-new-tokens", "8")
    expected = plain_transformers_on_gpu(tiny_next, 8, dtype="torch.float32", attn_implementation="'sdpa'")
    assert [r["text"] for r in records] == expected


def test_device_auto_with_max_memory_spreads_by_accelerate(tiny_next):
    plan = python_on_gpu(f"""
        import json
        from llavanext_cli.model.checkpoint import open_checkpoint
        from llavanext_cli.io.settings import load_settings
        settings = load_settings({{"model": {str(tiny_next)!r}, "device": "auto", "max_memory": "0=2GiB,cpu=8GiB"}},
                                 env={{}})
        checkpoint = open_checkpoint(settings)
        kwargs = checkpoint.plan.kwargs
        print(json.dumps([kwargs["device_map"], kwargs["max_memory"], str(checkpoint.model.device)]))
    """)
    assert plan == ["auto", {"0": 2 * 2**30, "cpu": 8 * 2**30}, "cuda:0"]
    spread = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--max-memory", "0=2GiB,cpu=8GiB",
                          "--max-new-tokens", "8")
    single = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--max-new-tokens", "8")
    assert [r["text"] for r in spread] == [r["text"] for r in single]


def test_compile_on_cuda_gives_the_same_answers(tiny_next):
    compiled = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--compile",
                            "--max-new-tokens", "8")
    eager = llava_on_gpu("caption", *IMAGES, "-m", tiny_next, "--device", "cuda", "--max-new-tokens", "8")
    assert [r["text"] for r in compiled] == [r["text"] for r in eager]


def test_a_real_cuda_out_of_memory_halves_the_batch(tiny_next):
    """Batches of more than one hit a real CUDA out-of-memory error (an allocation no GPU can hold); every item
    still gets the answer it gets in a batch of one."""
    texts = python_on_gpu(f"""
        import json, torch
        from llavanext_cli.engine.answering import answer_jobs
        from llavanext_cli.io.questions import PromptJob
        from llavanext_cli.model.checkpoint import open_checkpoint
        from llavanext_cli.engine.plan import GenerationOptions, plan_execution
        from llavanext_cli.io.records import Subject
        from llavanext_cli.io.settings import load_settings
        checkpoint = open_checkpoint(load_settings({{"model": {str(tiny_next)!r}, "device": "cuda"}}, env={{}}))
        jobs = [PromptJob(Subject.of({str(IMAGES[0])!r}), "Describe this image in detail.")] * 4
        options = plan_execution(checkpoint, GenerationOptions(max_new_tokens=6))
        alone = [r.text for r in answer_jobs(checkpoint, jobs[:1], options)]
        real_generate, sizes = checkpoint.model.generate, []
        def generate(**kwargs):
            sizes.append(kwargs["input_ids"].shape[0])
            if kwargs["input_ids"].shape[0] > 1:
                torch.empty(2**50, dtype=torch.uint8, device="cuda")  # raises torch.OutOfMemoryError
            return real_generate(**kwargs)
        checkpoint.model.generate = generate
        halved = [r.text for r in answer_jobs(checkpoint, jobs, options, batch_size=4)]
        print(json.dumps([alone, halved, sizes]))
    """)
    alone, halved, sizes = texts
    assert halved == alone * 4
    assert sizes[0] == 4 and max(sizes[1:]) < 4


# --- issue #21: every combination on a GPU ------------------------------------------------------------------------------

def test_compile_with_several_questions_chat_and_classify_equals_eager(tiny_next):
    """--compile gives plain batches a static cache and the compiled forward; the paths that continue from a cache of
    their own run eager with a dynamic one: the same records either way."""
    for args in (("ask", IMAGES[0], "-q", "What is it?", "-q", "Where is it?", "--max-new-tokens", "6"),
                 ("classify", IMAGES[0], "--labels", "a cat,a dog,a rocket")):
        common = ("-m", tiny_next, "--device", "cuda")
        compiled = llava_on_gpu(*args, *common, "--compile")
        eager = llava_on_gpu(*args, *common)
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in compiled] == \
            [{k: v for k, v in r.items() if k != "seconds"} for r in eager]
    turns = "What is it?\nAnd the colour?\n"
    chats = []
    for extra in (("--compile",), ()):
        result = subprocess.run([sys.executable, "-m", "llavanext_cli", "chat", str(IMAGES[0]), "-m", str(tiny_next),
                                 "--device", "cuda", "--max-new-tokens", "6", *extra], input=turns, text=True,
                                capture_output=True, env=gpu_environment(), cwd=str(REPO), timeout=600)
        assert result.returncode == 0, result.stderr
        chats.append(result.stdout)
    assert chats[0] == chats[1]


def test_classify_with_64_labels_holds_no_more_than_two_prompt_caches_more_than_with_2(tiny_next):
    peaks = python_on_gpu(f"""
        import json, torch
        from llavanext_cli.model.checkpoint import open_checkpoint
        from llavanext_cli.io.images import load_image
        from llavanext_cli.engine.scoring import score_labels
        from llavanext_cli.io.settings import load_settings
        checkpoint = open_checkpoint(load_settings({{"model": {str(tiny_next)!r}, "device": "cuda"}}, env={{}}))
        image = load_image({str(IMAGES[0])!r})
        peaks = []
        for count in (2, 64):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            score_labels(checkpoint, [image], "Which?", [f"label number {{i}}" for i in range(count)])
            peaks.append(torch.cuda.max_memory_allocated() - base)
        config = checkpoint.config.text_config
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (
            config.hidden_size // config.num_attention_heads) * 4
        print(json.dumps(peaks + [per_token * 3000]))
    """)
    few, many, prompt_cache = peaks
    assert many <= few + 2 * prompt_cache


@pytest.mark.parametrize("command", ["caption", "ask", "classify", "chat"])
def test_a_real_out_of_memory_in_every_path_is_an_error_record_not_a_traceback(tiny_next, command):
    """The 512 x 512 image's prompt (the longest) asks the GPU for more than it has, in a patched forward; the others
    are answered, that one is an error record (chat: that turn), exit 1."""
    big = EXAMPLES.parent / "tests" / "data" / "images" / "camera.png"
    args = {"caption": ["caption", str(IMAGES[0]), str(big)],
            "ask": ["ask", str(IMAGES[0]), str(big), "-q", "What?", "-q", "Where?"],
            "classify": ["classify", str(IMAGES[0]), str(big), "--labels", "a,b", "--batch-size", "2"],
            "chat": ["chat", str(IMAGES[0])]}[command]
    code = f"""
        import functools, sys, torch
        from transformers import LlavaNextForConditionalGeneration
        real = LlavaNextForConditionalGeneration.forward
        @functools.wraps(real)
        def forward(self, *args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 2500:
                torch.empty(2**50, dtype=torch.uint8, device="cuda")  # a real torch.OutOfMemoryError
            return real(self, *args, **kwargs)
        LlavaNextForConditionalGeneration.forward = forward
        from llavanext_cli.cli.main import main
        main({args + ["-m", str(tiny_next), "--device", "cuda", "--max-new-tokens", "4", "--format", "jsonl"]!r})
    """
    stdin = f"Hello\n/image {big}\nAnd this?\n" if command == "chat" else ""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True,
                            text=True, env=gpu_environment(), cwd=str(REPO), timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert any("out of memory" in line.get("error", "") for line in lines)
    assert any("error" not in line for line in lines)


def test_4bit_with_a_shared_prefix_equals_one_question_at_a_time(tiny_next):
    quant = ("-m", tiny_next, "--device", "cuda", "--quant", "4bit", "--max-new-tokens", "6")
    together = llava_on_gpu("ask", IMAGES[0], "-q", "What is it?", "-q", "Where is it?", *quant)
    one = llava_on_gpu("ask", IMAGES[0], "-q", "What is it?", *quant)
    two = llava_on_gpu("ask", IMAGES[0], "-q", "Where is it?", *quant)
    assert [r["text"] for r in together] == [one[0]["text"], two[0]["text"]]
