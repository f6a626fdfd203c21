"""`llava init-model`: real, loadable, reproducible checkpoints from a YAML spec; bad specs name the field."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, run_cli


def test_checkpoint_loads_with_plain_transformers(tiny_next, hf_reference):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    processor, model = hf_reference(tiny_next)
    assert isinstance(processor, LlavaNextProcessor) and isinstance(model, LlavaNextForConditionalGeneration)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index == 32000
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size
    assert processor.chat_template  # the mistral-instruct format, as a Jinja template
    assert sorted(p.name for p in tiny_next.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(tiny_next.glob("*.bin"))


def test_every_file_has_the_mode_a_plain_open_gives(tiny_next):
    """The weights too (transformers writes them through a private 0600 temporary file): a checkpoint built for a
    team or a container is readable like the rest of its folder."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tiny_next.iterdir() if path.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_llava_15_checkpoint_has_no_chat_template(tiny_llava, hf_reference):
    from transformers import LlavaForConditionalGeneration

    processor, model = hf_reference(tiny_llava)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert not getattr(processor, "chat_template", None)


def test_real_mistral_tokenizer(tiny_next):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_next)
    assert len(tokenizer) == 32002  # the 32,000 Mistral-7B pieces + <image> + <pad>
    assert tokenizer("Hello world").input_ids == [1, 22557, 1526]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_next):
    from safetensors.torch import load_file

    assert run_cli("init-model", REPO / "configs" / "tiny-llava-next.yaml", tmp_path / "a").exit_code == 0
    assert run_cli("init-model", REPO / "configs" / "tiny-llava-next.yaml", tmp_path / "b", "--seed", "7").exit_code == 0
    base, same, other = (load_file(p / "model.safetensors") for p in (tiny_next, tmp_path / "a", tmp_path / "b"))
    assert all((base[k] == same[k]).all() for k in base)
    assert any(not (base[k] == other[k]).all() for k in base)


def test_prompt_sensitive(tiny_next, hf_reference):
    """Different questions about one image give different answers (text_qk_scale), or prompt tests prove nothing."""
    import torch
    from PIL import Image

    processor, model = hf_reference(tiny_next)
    image = Image.open(REPO / "examples" / "chelsea.png").convert("RGB")
    answers = set()
    for question in ("What is shown in this image?", "Describe the colours.", "Is there a cat?", "Count the legs."):
        inputs = processor(images=image, text=f"[INST] <image>\n{question} [/INST]", return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        answers.add(tuple(out[0, inputs.input_ids.shape[1]:].tolist()))
    assert len(answers) == 4


def _spec(tmp_path, **changes):
    spec = yaml.safe_load((REPO / "configs" / "tiny-llava.yaml").read_text())
    for dotted, value in changes.items():
        target = spec
        *parents, last = dotted.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("changes,field", [
    ({"architecture": "llava_onevision"}, "architecture"),
    ({"colour": "red"}, "colour"),
    ({"vision__hiden_size": 64}, "vision.hiden_size"),
    ({"text__num_hidden_layers": "two"}, "text.num_hidden_layers"),
    ({"text__model_type": "no-such-model"}, "text.model_type"),
    ({"text__vocab_size": 100}, "text.vocab_size"),
    ({"config__vision_feature_select_strategy": 3}, "config.vision_feature_select_strategy"),
    ({"chat_template": "no-such-format"}, "chat_template"),
    ({"tokenizer": "./no-such-dir"}, "tokenizer"),
    ({"init__text_qk_scale": -1}, "init.text_qk_scale"),
    ({"seed": "abc"}, "seed"),
    ({"vision__image_size": 100}, "vision.image_size"),
    ({"vision__model_type": "llama"}, "vision.model_type"),
    ({"text__num_key_value_heads": 3}, "text.num_key_value_heads"),
    ({"config__vision_feature_layer": -20}, "config.vision_feature_layer"),
    ({"config__vision_feature_select_strategy": "bogus"}, "config"),
])
def test_bad_spec_exits_2_naming_the_field(tmp_path, changes, field):
    result = run_cli("init-model", _spec(tmp_path, **changes), tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert f"'{field}'" in result.stderr and result.stderr.startswith("Error:")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("init-model", REPO / "configs" / "tiny-llava.yaml", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_missing_spec_is_a_setup_error_exit_3(tmp_path):
    """As for any file the tool cannot load (a settings file, a prompt format): exit 3, the README's code."""
    result = run_cli("init-model", tmp_path / "nope.yaml", tmp_path / "out")
    assert result.exit_code == 3 and "spec file not found" in result.stderr


def test_customised_config_like_the_seed_use_case(tmp_path):
    """The seeds' "customizing the model configuration": image size, pinpoints, projector activation, layer."""
    spec = yaml.safe_load((REPO / "configs" / "tiny-llava-next.yaml").read_text())
    spec["vision"].update(image_size=224, patch_size=14)
    spec["config"] = {"projector_hidden_act": "relu", "vision_feature_layer": -1,
                      "image_grid_pinpoints": [[224, 224], [448, 448]]}
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("init-model", path, tmp_path / "custom")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert config["projector_hidden_act"] == "relu" and config["vision_feature_layer"] == -1
    assert config["image_grid_pinpoints"] == [[224, 224], [448, 448]]
    report = run_cli("inspect-config", tmp_path / "custom", "--image-size", "500x500", "--format", "json")
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["grid"] == [2, 2]
    assert run_cli("caption", REPO / "examples" / "chelsea.png", "-m", tmp_path / "custom", "--max-new-tokens",
                   "3").exit_code == 0


def test_full_feature_strategy(tmp_path):
    """The seeds' example also sets vision_feature_select_strategy 'full': it runs on LLaVA-1.5; on LLaVA-NeXT with a
    CLIP tower (whose CLS token then breaks the anyres grid) the spec is refused before anything is written."""
    for name, works in (("tiny-llava.yaml", True), ("tiny-llava-next.yaml", False)):
        spec = yaml.safe_load((REPO / "configs" / name).read_text())
        spec["config"]["vision_feature_select_strategy"] = "full"
        path = tmp_path / f"full-{name}"
        path.write_text(yaml.safe_dump(spec))
        out = tmp_path / f"out-{name}"
        result = run_cli("init-model", path, out)
        if works:
            assert result.exit_code == 0, result.stderr
            caption = run_cli("caption", REPO / "examples" / "chelsea.png", "-m", out, "--max-new-tokens", "3")
            assert caption.exit_code == 0, caption.stderr
        else:
            assert result.exit_code == 2 and "does not run" in result.stderr
            assert not (out / "model.safetensors").exists()


def test_spec_too_big_for_the_machine_is_refused_before_allocating(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("architecture: llava\n")  # transformers' defaults: a 7B model
    result = run_cli("init-model", path, tmp_path / "out")
    assert result.exit_code == 2 and "parameters" in result.stderr and "memory" in result.stderr


def test_bad_pinpoints_are_named(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "tiny-llava-next.yaml").read_text())
    spec["config"]["image_grid_pinpoints"] = [[336, 600]]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("init-model", path, tmp_path / "out")
    assert result.exit_code == 2 and "'config.image_grid_pinpoints'" in result.stderr


def test_out_dir_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = run_cli("init-model", REPO / "configs" / "tiny-llava.yaml", target)
    assert result.exit_code == 2 and "not a directory" in result.stderr
