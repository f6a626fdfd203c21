"""One image, many prompts: each image is loaded, preprocessed and encoded once for all its questions (and a chat
image once per conversation), and the answers stay those of asking one question at a time the seeds' way."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, TEST_IMAGES, run_cli

IMAGES = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", TEST_IMAGES / "page.png"]
QUESTIONS = ["What is it?", "How many people are there?", "Is it indoors?"]


def rendered(question: str, images: int = 1) -> str:
    return "[INST] " + "<image>\n" * images + f"{question} [/INST]"


def records_of(result):
    assert result.exit_code in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def expected(tiny_next, hf_reference):
    """Plain transformers, one (image, question) at a time."""
    return {(str(image), question): hf_reference.answer(tiny_next, rendered(question), [image], 6)
            for image in IMAGES for question in QUESTIONS}


def test_repeated_q_gives_image_major_records_equal_to_one_question_at_a_time(tiny_next, expected):
    args = [arg for question in QUESTIONS for arg in ("-q", question)]
    records = records_of(run_cli("ask", *IMAGES, *args, "-m", tiny_next, "--max-new-tokens", "6",
                                 "--format", "jsonl"))
    assert [(r["image"], r["prompt"]) for r in records] == [(str(i), q) for i in IMAGES for q in QUESTIONS]
    assert [r["text"] for r in records] == [expected[(r["image"], r["prompt"])] for r in records]
    assert len({r["text"] for r in records}) > len(IMAGES)  # the questions matter to the tiny model
    text = run_cli("ask", *IMAGES[:2], *args[:4], "-m", tiny_next, "--max-new-tokens", "6").stdout.splitlines()
    assert text[1] == f"{IMAGES[0]}\t{QUESTIONS[1]}\t{' '.join(expected[(str(IMAGES[0]), QUESTIONS[1])].split())}"


@pytest.mark.parametrize("extra", [("--batch-size", "3"), ("--workers", "1"), ("--batch-size", "2", "--workers", "2")])
def test_batches_and_workers_give_the_same_answers(tiny_next, expected, extra):
    args = [arg for question in QUESTIONS for arg in ("-q", question)]
    records = records_of(run_cli("ask", *IMAGES, *args, "-m", tiny_next, "--max-new-tokens", "6",
                                 "--format", "jsonl", *extra))
    assert [r["text"] for r in records] == [expected[(str(i), q)] for i in IMAGES for q in QUESTIONS]


def test_a_shuffled_questions_file_keeps_file_order_and_answers(tiny_next, expected, tmp_path):
    lines = [{"image": str(image), "question": question, "id": f"{n}-{m}"}
             for n, image in enumerate(IMAGES) for m, question in enumerate(QUESTIONS)]
    random.Random(7).shuffle(lines)
    lines.insert(4, {"image": str(tmp_path / "gone.png"), "question": "Anything?", "id": "gone"})
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli("ask", "--questions", path, "-m", tiny_next, "--max-new-tokens", "6", "--format", "jsonl")
    records = records_of(result)
    assert result.exit_code == 1
    assert [r["id"] for r in records] == [line["id"] for line in lines]
    for record in records:
        if record["id"] == "gone":
            assert record["error"] == "no such file"
        else:
            assert record["text"] == expected[(record["image"], record["prompt"])]


def test_resume_keys_stay_image_and_question(tiny_next, expected, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = [arg for question in QUESTIONS for arg in ("-q", question)]
    full = records_of(run_cli("ask", *IMAGES, *args, "-m", tiny_next, "--max-new-tokens", "6", "--format", "jsonl"))
    out.write_text("".join(json.dumps(r) + "\n" for r in full[:4]))  # an interrupted run: 4 of 9 done
    result = run_cli("ask", *IMAGES, *args, "-m", tiny_next, "--max-new-tokens", "6", "-o", out, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "4 of 9 already done" in result.stderr
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["image"], r["prompt"], r["text"]) for r in final) == \
        sorted((r["image"], r["prompt"], r["text"]) for r in full)


def test_each_image_is_preprocessed_and_encoded_once_for_all_its_questions(tiny_next, expected):
    from llavanext_cli.engine.answering import answer_jobs
    from llavanext_cli.io.questions import PromptJob
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={})).load()
    encoded, preprocessed = [], []
    hook = checkpoint.model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(1))
    image_processor = checkpoint.processor.image_processor
    real_preprocess = image_processor.preprocess

    def counting_preprocess(images, *args, **kwargs):
        preprocessed.append(len(images) if isinstance(images, list) else 1)
        return real_preprocess(images, *args, **kwargs)

    image_processor.preprocess = counting_preprocess
    try:
        jobs = [PromptJob(Subject.of(str(image)), question) for question in QUESTIONS for image in IMAGES[:2]]
        records = list(answer_jobs(checkpoint, jobs, plan_execution(checkpoint, GenerationOptions(max_new_tokens=6))))
    finally:
        hook.remove()
        image_processor.preprocess = real_preprocess
    assert [r.text for r in records] == [expected[(j.subject.images[0], j.prompt)] for j in jobs]
    assert len(encoded) == 2 and sum(preprocessed) == 2  # two images, six questions


def test_shared_ids_are_the_processors_own(tiny_next, tiny_llava):
    """The prompts' ids are built from one processor call; they equal what the processor gives each prompt."""
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.io.images import load_image
    from llavanext_cli.engine.prefix_cache import prepare_shared
    from llavanext_cli.model.prompts import single_image_conversation
    from llavanext_cli.io.settings import load_settings

    for path in (tiny_next, tiny_llava):
        checkpoint = open_checkpoint(load_settings({"model": str(path)}, env={}))
        processor = checkpoint.processor
        for images in ([load_image(IMAGES[0])], [load_image(IMAGES[1]), load_image(IMAGES[2])]):
            prompts = [checkpoint.prompt.format.render(single_image_conversation(q, len(images))) for q in QUESTIONS]
            shared = prepare_shared(checkpoint.processor, prompts, images)
            assert shared is not None
            for prompt, ids in zip(prompts, shared.ids):
                own = processor(images=images, text=[prompt], return_tensors="pt")
                assert own["input_ids"][0].tolist() == ids
                assert bool((own["pixel_values"] == shared.image_tensors["pixel_values"]).all())
            assert shared.ids[0][:shared.prefix_length] == shared.ids[1][:shared.prefix_length]
            assert shared.prefix_length > 500  # the image tokens are in the shared part


def test_beam_search_does_not_share_and_still_equals_transformers(tiny_next, hf_reference):
    records = records_of(run_cli("ask", IMAGES[0], "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-m", tiny_next,
                                 "--max-new-tokens", "6", "--num-beams", "2", "--format", "jsonl"))
    assert [r["text"] for r in records] == [hf_reference.answer(tiny_next, rendered(q), [IMAGES[0]], 6, num_beams=2)
                                            for q in QUESTIONS[:2]]


def test_together_with_several_questions(tiny_next, hf_reference):
    records = records_of(run_cli("ask", *IMAGES[:2], "--together", "-q", QUESTIONS[0], "-q", QUESTIONS[2], "-m",
                                 tiny_next, "--max-new-tokens", "6", "--format", "jsonl"))
    assert [r["prompt"] for r in records] == [QUESTIONS[0], QUESTIONS[2]]
    assert all(r["images"] == [str(i) for i in IMAGES[:2]] for r in records)
    assert [r["text"] for r in records] == [hf_reference.answer(tiny_next, rendered(q, 2), IMAGES[:2], 6)
                                            for q in (QUESTIONS[0], QUESTIONS[2])]


@pytest.mark.parametrize("args,message", [
    (("-q", "What?", "-q", " "), "empty question"),
    (("-q", "What?", "--questions", "q.jsonl"), "--questions takes"),
])
def test_bad_questions_exit_2(args, message):
    result = run_cli("ask", IMAGES[0], *args)
    assert result.exit_code == 2 and message in result.stderr


def test_data_parallel_ranks_take_whole_images():
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.sharding import DataParallel, my_share

    class Job:
        def __init__(self, image, question):
            self.subject, self.prompt = Subject.of(image), question

    jobs = [Job(image, q) for image in "abcde" for q in "xyz"] + [Job("a", "w")]
    shares = [my_share(jobs, DataParallel(rank, 2, rank)) for rank in (0, 1)]
    assert sorted(i for share in shares for i, _ in share) == list(range(len(jobs)))
    assert {job.subject.images[0] for _, job in shares[0]} == {"a", "c", "e"}  # "a" with its late question too
    assert {job.subject.images[0] for _, job in shares[1]} == {"b", "d"}


# --- chat keeps its cache --------------------------------------------------------------------------------------


def test_a_five_turn_chat_with_a_second_image_equals_rerendering_every_turn(tiny_next, hf_reference):
    from test_chat import assistant, reference_reply, user

    turns = ["What is this?", "Tell me more.", "And this one?", "Which is bigger?", "Thanks, anything else?"]
    lines = turns[:2] + [f"/image {IMAGES[1]}"] + turns[2:]
    result = run_cli("chat", IMAGES[0], "-m", tiny_next, "--max-new-tokens", "6", "--format", "jsonl",
                     stdin="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.stderr
    replies = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    history = []
    for number, turn in enumerate(turns):
        images = [IMAGES[0]] if number == 0 else [IMAGES[1]] if number == 2 else []
        history.append(user(turn, *images))
        expected = reference_reply(hf_reference, tiny_next, history)
        assert replies[number] == expected, number
        history.append(assistant(expected))


def test_chat_turns_run_only_their_new_tokens(tiny_next):
    from llavanext_cli.engine.chat import ChatSession
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={})).load()
    encoded = []
    hook = checkpoint.model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(1))
    try:
        session = ChatSession(checkpoint, plan_execution(checkpoint, GenerationOptions(max_new_tokens=5)))
        session.attach(str(IMAGES[0]))
        first = session.send("What is this?")
        second = session.send("Tell me more.")
        session.attach(str(IMAGES[1]))
        third = session.send("And this one?")
        session.reset()
        fresh = session.send("Hello")
    finally:
        hook.remove()
    assert first.reused_tokens == 0 and second.reused_tokens > 1000 and third.reused_tokens > second.reused_tokens
    assert len(encoded) == 2  # each image through the vision tower once
    assert fresh.reused_tokens == 0


def test_an_interrupted_turn_leaves_no_cache_and_the_next_turn_is_still_exact(tiny_next, hf_reference):
    from test_chat import assistant, reference_reply, user

    from llavanext_cli.engine.chat import ChatSession
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={})).load()
    session = ChatSession(checkpoint, plan_execution(checkpoint, GenerationOptions(max_new_tokens=6)))
    session.attach(str(IMAGES[0]))
    first = session.send("What is this?")

    def interrupted(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send("A long story, please.", on_text=interrupted)
    assert session._cache.cache is None and len(session.messages) == 2
    second = session.send("Tell me more.")
    history = [user("What is this?", IMAGES[0]), assistant(first.text), user("Tell me more.")]
    assert second.text == reference_reply(hf_reference, tiny_next, history)
    assert second.reused_tokens == 0


def test_the_servers_prefix_store_keeps_what_fits_its_budget_and_drops_the_least_recently_used():
    import torch
    from transformers import DynamicCache

    from llavanext_cli.engine.prefix_cache import ConversationCache, PrefixStore, cache_bytes

    def conversation(ids):
        cache = DynamicCache()
        for layer in range(2):
            cache.update(torch.zeros(1, 2, len(ids), 8), torch.zeros(1, 2, len(ids), 8), layer)
        return ConversationCache(cache=cache, ids=list(ids))

    one = cache_bytes(conversation(range(100)).cache)
    store = PrefixStore(budget_bytes=2 * one)
    first, second, third = conversation(range(100)), conversation(range(1000, 1100)), conversation(range(2000, 2100))
    store.give(first)
    store.give(second)
    assert len(store) == 2 and store.held() == 2 * one
    # A request that begins like the first takes it (the best common prefix), which makes it the most recent.
    assert store.take([*range(50), 7, 7]) is first
    store.give(first)
    store.give(third)  # over budget: the least recently used (the second) goes, and lets go of its tensors
    assert len(store) == 2 and store.held() <= store.budget
    assert second.cache is None and second.ids == []
    assert store.take(list(range(1000, 1050))).cache is None  # nothing begins like it now: a fresh cache
    # A prompt that shares only its first tokens (a template) with a conversation leaves that conversation's cache
    # alone: a fresh one, and the conversation's next turn still finds its own.
    assert store.take([*range(2000, 2010), 5, 5]).cache is None and len(store) == 2
    assert store.take(list(range(2000, 2060))) is third
    # A budget smaller than one conversation keeps none.
    tiny = PrefixStore(budget_bytes=one - 1)
    tiny.give(conversation(range(100)))
    assert len(tiny) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), max_size=12), min_size=1, max_size=4))
def test_common_prefix_length_is_the_count_of_leading_ids_all_share(sequences):
    from llavanext_cli.engine.prefix_cache import common_prefix_length

    expected = 0
    while all(len(sequence) > expected for sequence in sequences) and \
            len({sequence[expected] for sequence in sequences}) == 1:
        expected += 1
    assert common_prefix_length(sequences) == expected
