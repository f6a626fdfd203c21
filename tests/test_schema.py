"""--schema: decoding constrained to a JSON Schema (llguidance), over whole folders: every success record's data
validates, batches and workers change nothing, resume, CSV columns, answers cut short, schemas refused."""

from __future__ import annotations

import csv
import io
import json
import shutil

import jsonschema
import pytest

from conftest import EXAMPLES, TEST_IMAGES, run_cli

IMAGES = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png", TEST_IMAGES / "page.png",
          TEST_IMAGES / "camera.png", TEST_IMAGES / "horse.png"]
# Every kind the contract names: strings with maxLength, bounded integers, enums, booleans, arrays with maxItems,
# nested objects, required.
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 12},
        "kind": {"enum": ["person", "animal", "object"]},
        "outdoor": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}},
        "main": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8},
                                                  "sure": {"type": "boolean"}},
                 "required": ["label"]},
        "note": {"type": "string", "maxLength": 5},
    },
    "required": ["count", "kind", "outdoor", "main"],
}


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "answer.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def run(*args):
    result = run_cli(*args)
    assert result.exit_code in (0, 1), result.stderr
    return result, [json.loads(line) for line in result.stdout.splitlines()]


def check_records(records, schema=SCHEMA):
    successes = [r for r in records if "error" not in r]
    for record in successes:
        jsonschema.validate(record["data"], schema)
        assert json.loads(record["text"]) == record["data"]
        assert record["text"] == json.dumps(record["data"], separators=(",", ":"), ensure_ascii=False)  # compact
    for record in records:
        if "error" in record:
            assert record["error"].startswith("answer cut at ") and "raise --max-new-tokens" in record["error"]
    return successes


@pytest.fixture(scope="module")
def greedy(tiny_next, schema_file):
    result, records = run("caption", *IMAGES, "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80",
                          "--format", "jsonl")
    return result, records


def test_every_success_validates_greedy_and_sampled(tiny_next, schema_file, greedy):
    result, records = greedy
    assert [r["image"] for r in records] == [str(p) for p in IMAGES]
    assert len(check_records(records)) >= 3
    assert result.exit_code == (1 if any("error" in r for r in records) else 0)
    for seed in ("1", "2"):
        _, sampled = run("caption", *IMAGES[:3], "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80",
                         "--temperature", "1.3", "--seed", seed, "--workers", "1", "--format", "jsonl")
        check_records(sampled)


@pytest.mark.parametrize("extra", [("--batch-size", "3"), ("--workers", "1")])
def test_batches_and_workers_give_the_same_records(tiny_next, schema_file, greedy, extra):
    _, records = run("caption", *IMAGES, "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80",
                     "--format", "jsonl", *extra)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in greedy[1]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in records] == strip


def test_several_questions_share_the_image_and_still_answer_as_one_at_a_time(tiny_next, schema_file):
    args = ("-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80", "--format", "jsonl")
    _, together = run("ask", *IMAGES[:2], "-q", "Describe it.", "-q", "What is it?", *args)
    alone = [run("ask", image, "-q", question, *args)[1][0] for image in IMAGES[:2]
             for question in ("Describe it.", "What is it?")]
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(together) == strip(alone)
    check_records(together)


def test_the_concise_form(tiny_next):
    concise = "count int 0..9, kind: person|animal|object, outdoor bool, tags list[int]"
    _, records = run("caption", *IMAGES[:3], "-m", tiny_next, "--schema", concise, "--max-new-tokens", "60",
                     "--format", "jsonl")
    schema = {"type": "object", "additionalProperties": False, "required": ["count", "kind", "outdoor", "tags"],
              "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
                             "kind": {"enum": ["person", "animal", "object"]}, "outdoor": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"type": "integer"}}}}
    successes = check_records(records, schema)
    assert successes and all(list(r["data"]) == ["count", "kind", "outdoor", "tags"] for r in successes)


def test_parse_concise():
    from llavanext_cli.errors import UsageError
    from llavanext_cli.engine.structured import parse_concise

    assert parse_concise("name, age int: in years, kind: a|b, score float -1..1.5, ok bool, tags list, ids list[int]") \
        == {"type": "object", "additionalProperties": False,
            "required": ["name", "age", "kind", "score", "ok", "tags", "ids"],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "description": "in years"},
                           "kind": {"enum": ["a", "b"]}, "score": {"type": "number", "minimum": -1.0, "maximum": 1.5},
                           "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
                           "ids": {"type": "array", "items": {"type": "integer"}}}}
    for bad in ("", "a int, a str", "a colour", "a int 5..1", "a str 0..3", "a: x||y", "a int: x|y", "1a int"):
        with pytest.raises(UsageError):
            parse_concise(bad)


def test_a_slash_in_a_concise_description_is_not_a_file_name():
    from llavanext_cli.engine.structured import read_schema_text

    schema, source = read_schema_text("place: indoor|outdoor, note str: a yes/no answer")
    assert source == "concise form" and schema["properties"]["note"]["description"] == "a yes/no answer"


def test_closing_objects_keeps_a_required_property_the_schema_does_not_describe(tiny_next):
    import jsonschema

    from llavanext_cli.engine.structured import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["b"] == {}
    jsonschema.validate({"a": 1, "b": [True]}, closed)  # what the schema as given allows, the decoder allows
    # compiled and decoded, not refused as unsatisfiable (the tiny model wanders in b's any-value: cut short)
    result = run_cli("caption", IMAGES[0], "-m", tiny_next, "--schema", json.dumps(schema), "--max-new-tokens", "4")
    assert result.exit_code == 1 and "answer cut at 4 tokens" in result.stderr, result.stderr


def test_generation_ends_where_the_grammar_ends(tiny_next, tmp_path):
    """A checkpoint whose generation config names another end-of-sequence id than its tokenizer (the grammar ends
    on the tokenizer's): generate stops there too, instead of going on unconstrained after the JSON."""
    other = tmp_path / "other-eos"
    shutil.copytree(tiny_next, other)
    generation = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 5}))
    result, records = run("caption", *IMAGES[:2], "-m", other, "--schema", "count int 0..9, ok bool",
                          "--max-new-tokens", "40", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert all(json.loads(r["text"]) == r["data"] for r in records)


def test_resume(tiny_next, schema_file, greedy, tmp_path):
    out = tmp_path / "answers.jsonl"
    done = [r for r in greedy[1] if "error" not in r][:2]
    out.write_text("".join(json.dumps(r) + "\n" for r in done))
    result = run_cli("caption", *IMAGES, "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80", "-o",
                     out, "--resume")
    assert result.exit_code in (0, 1) and f"{len(done)} of {len(IMAGES)} already done" in result.stderr
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in final) == sorted(str(p) for p in IMAGES)
    assert {r["image"]: r.get("data") for r in final} == {r["image"]: r.get("data") for r in greedy[1]}


def test_csv_has_a_column_per_property_and_text_has_the_json(tiny_next, schema_file, greedy, tmp_path):
    out = tmp_path / "answers.csv"
    run_cli("caption", *IMAGES, "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80", "-o", out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    header = list(rows[0])
    assert header[:6] == ["image", "prompt", "text", "model", "new_tokens", "seconds"]
    assert "error" in header or all("error" not in r for r in greedy[1])
    assert [name for name in header if name in SCHEMA["properties"]] == \
        [name for name in SCHEMA["properties"] if any(name in r.get("data", {}) for r in greedy[1])]
    for row, record in zip(rows, greedy[1]):
        for name, value in record.get("data", {}).items():  # JSON text (true, [..]) except strings and numbers
            assert row[name] == (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    text = run_cli("caption", IMAGES[1], "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "80").stdout
    assert json.loads(text) == greedy[1][1]["data"]


def test_a_copied_key_named_like_a_property_keeps_one_meaning_per_column(tiny_next, tmp_path):
    questions = tmp_path / "q.jsonl"
    lines = [{"image": str(IMAGES[0]), "question": "How many?"},
             {"image": str(IMAGES[1]), "question": "How many?", "count": 7}]  # the ground truth, say
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("ask", "--questions", questions, "-m", tiny_next, "--schema", "count int 0..9, ok bool",
            "--max-new-tokens", "30")
    records = [json.loads(line) for line in run_cli(*args, "--format", "jsonl").stdout.splitlines()]
    assert all("data" in record for record in records)
    rows = list(csv.DictReader(io.StringIO(run_cli(*args, "--format", "csv").stdout)))
    assert list(rows[0])[-3:] == ["data.count", "ok", "count"]
    for row, record in zip(rows, records):
        assert row["count"] == str(record.get("count", ""))  # the copied key, in every row
        assert row["data.count"] == str(record["data"]["count"]) and row["ok"] in ("true", "false")


def test_an_answer_cut_short_is_an_error_record_never_bad_data(tiny_next, schema_file):
    result, records = run("caption", *IMAGES[:3], "-m", tiny_next, "--schema", schema_file, "--max-new-tokens", "4",
                          "--format", "jsonl")
    assert result.exit_code == 1
    assert records == [{"image": str(p), "error": "answer cut at 4 tokens before the JSON was complete; raise "
                                                  "--max-new-tokens"} for p in IMAGES[:3]]


@pytest.mark.parametrize("schema,message", [
    ("{not json", "not JSON"),
    ('{"type": "nope"}', "not a valid JSON Schema"),
    ('{"type": "array", "uniqueItems": true}', "'uniqueItems' cannot be enforced"),
    ('{"type": "object", "properties": {"a": {"type": "string", "maxLenght": 3}}}', "'maxLenght' cannot be enforced"),
    ('{"type": "string", "format": "int32"}', "format 'int32' cannot be enforced"),
    ('{"$ref": "https://example.com/schema.json"}', "only references within the schema"),
    ("count int, count str", "given twice"),
    ("missing/schema.json", "no such file"),
    ("schemas/count", "no such file"),
    (" ", "--schema is empty"),
    (str(EXAMPLES), "is a directory"),
])
def test_a_schema_that_cannot_be_enforced_exits_2_before_anything_loads(tmp_path, schema, message):
    result = run_cli("caption", IMAGES[0], "-m", tmp_path / "no-model", "--schema", schema)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stderr.count("Error:") == 1


def test_a_schema_the_engine_refuses_exits_2_before_the_weights_load(tiny_next, tmp_path):
    """Compiling needs the tokenizer, not the weights: a damaged weights file is never reached."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_next, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    unsatisfiable = '{"type": "integer", "minimum": 5, "maximum": 3}'
    result = run_cli("caption", IMAGES[0], "-m", broken, "--schema", unsatisfiable)
    assert result.exit_code == 2 and "cannot be enforced" in result.stderr, result.stderr
    beams = run_cli("caption", IMAGES[0], "-m", broken, "--schema", "a int", "--num-beams", "2")
    assert beams.exit_code == 2 and "--num-beams" in beams.stderr


def test_inspect_config_shows_the_prompt_the_schema_sends(tiny_next):
    result = run_cli("inspect-config", tiny_next, "--schema", "count int, kind: a|b", "--prompt", "How many?",
                     "--format", "json")
    assert result.exit_code == 0, result.stderr
    prompt = json.loads(result.stdout)["prompt"]
    assert prompt.startswith("[INST] <image>\nHow many?\nAnswer with a JSON object that matches this JSON Schema: ")
    assert '{"type":"object","properties":{"count":{"type":"integer"},"kind":{"enum":["a","b"]}}' in prompt
