"""Model loading: flags mapped onto transformers 5, quantization that spares the vision side, safe checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest

from llavanext_cli.errors import SetupError
from llavanext_cli.model.loading import LoadOptions, load_config, load_model, load_processor, quantized_module_names

from conftest import EXAMPLES, run_cli

IMAGE = EXAMPLES / "chelsea.png"


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantization_spares_vision_tower_projector_and_lm_head(tiny_next, quant):
    import torch

    config = load_config(str(tiny_next))
    model = load_model(str(tiny_next), config, LoadOptions(quant=quant))
    quantized = set(quantized_module_names(model))
    language_linears = {name for name, module in model.named_modules()
                        if name.startswith("model.language_model") and isinstance(module, torch.nn.Linear)}
    assert language_linears and language_linears == quantized
    assert not any(name.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head"))
                   for name in quantized)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_caption_runs(tiny_next, quant):
    result = run_cli("caption", IMAGE, "-m", tiny_next, "--quant", quant, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()


def test_quant_type_needs_4bit(tiny_next):
    result = run_cli("caption", IMAGE, "-m", tiny_next, "--quant-type", "fp4")
    assert result.exit_code == 2 and "--quant-type" in result.stderr


def test_dtype_flag(tiny_next):
    import torch

    config = load_config(str(tiny_next))
    assert load_model(str(tiny_next), config, LoadOptions(dtype="bfloat16")).dtype == torch.bfloat16
    assert load_model(str(tiny_next), config, LoadOptions()).dtype == torch.float32  # auto on the CPU


def test_attn_flag(tiny_next):
    config = load_config(str(tiny_next))
    model = load_model(str(tiny_next), config, LoadOptions(attn="eager"))
    assert model.config._attn_implementation == "eager"


def test_flash_attention_without_flash_attn_exits_3_with_hint(tiny_next):
    result = run_cli("caption", IMAGE, "-m", tiny_next, "--attn", "flash_attention_2")
    assert result.exit_code == 3
    assert "flash-attn" in result.stderr and "Hint:" in result.stderr and "Traceback" not in result.stderr


def test_missing_gpu_exits_3(tiny_next):
    result = run_cli("caption", IMAGE, "-m", tiny_next, "--device", "cuda:0")
    assert result.exit_code == 3 and "CUDA" in result.stderr


def test_processor_is_left_padded(tiny_next):
    processor = load_processor(str(tiny_next), load_config(str(tiny_next)))
    assert processor.tokenizer.padding_side == "left"


def test_old_processor_gets_its_attributes_from_the_config(tmp_path, tiny_next, hf_reference):
    """A pre-v4.46 processor_config.json lacks patch_size / vision_feature_select_strategy /
    num_additional_image_tokens: the tool takes them from the model config and still expands <image> correctly."""
    old = tmp_path / "old-processor"
    shutil.copytree(tiny_next, old)
    processor_config = json.loads((old / "processor_config.json").read_text())
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        processor_config.pop(key, None)
    (old / "processor_config.json").write_text(json.dumps(processor_config))
    config = load_config(str(old))
    patched = load_processor(str(old), config)
    assert patched.patch_size == 14 and patched.vision_feature_select_strategy == "default"
    assert patched.num_additional_image_tokens == 1
    new = run_cli("caption", IMAGE, "-m", tiny_next, "--max-new-tokens", "6")
    result = run_cli("caption", IMAGE, "-m", old, "--max-new-tokens", "6")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == new.stdout


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_next):
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_next, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    result = run_cli("caption", IMAGE, "-m", bad)
    assert result.exit_code == 3 and "safetensors" in result.stderr


def test_remote_code_checkpoint_is_refused(tmp_path, tiny_next):
    bad = tmp_path / "remote"
    shutil.copytree(tiny_next, bad)
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(SetupError, match="auto_map"):
        load_config(str(bad))
    assert run_cli("inspect-config", bad).exit_code == 3


def test_missing_checkpoint_exits_3(tmp_path):
    result = run_cli("caption", IMAGE, "-m", tmp_path / "nothing-here")
    assert result.exit_code == 3 and "not found" in result.stderr
    result = run_cli("caption", IMAGE, "-m", "llava-hf/llava-v1.6-mistral-7b-hf", "--offline")
    assert result.exit_code == 3 and "Hint:" in result.stderr


def test_unsupported_architecture_exits_3(tmp_path, tiny_next):
    other = tmp_path / "other"
    shutil.copytree(tiny_next, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(config))
    result = run_cli("inspect-config", other)
    assert result.exit_code == 3
