"""Zero-shot classification by scoring each label as the assistant's answer (teacher forcing).

For label L the scored text is `prompt + L`, with one space between them unless the prompt ends in whitespace; its
score is the sum (or, with normalize="mean", the mean) of the log-probabilities of the tokens after the prompt's
tokens, and the label probabilities are the softmax of the scores. Each image and prompt run through the model
once; each label's tokens then continue from the prompt's KV cache, which is cut back after each label, so that
memory does not grow with the number of labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from llavanext_cli.model.cache_api import cache_of, with_cache
from llavanext_cli.model.checkpoint import Checkpoint
from llavanext_cli.errors import InputError, UsageError
from llavanext_cli.io.images import ImageFetching
from llavanext_cli.model.prompts import single_image_conversation
from llavanext_cli.io.records import Classification, Failure, Record, Subject, input_key


def parse_labels(text: str | None = None, lines: Sequence[str] | None = None,
                 given: Sequence[str] | None = None) -> list[str]:
    """Labels from "a,b,c", from a file's lines (`#` comments and blank lines skipped), or `given` as a list (the
    Python API); empty or duplicate labels, and fewer than two, are usage errors."""
    if given is not None:
        labels = [str(label).strip() for label in given]
    elif lines is not None:
        labels = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        labels = [part.strip() for part in (text or "").split(",")]
    if not labels or (len(labels) == 1 and not labels[0]):
        raise UsageError("no labels", hint='pass --labels "a,b,c", --labels-file FILE (one label a line), '
                                             "or --truth-from-dirs (class folders)")
    if any(not label for label in labels):
        raise UsageError("empty label in --labels", hint='labels are comma-separated: "cat,dog,bird"')
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise UsageError(f"duplicate label {label!r}")
        seen.add(label)
    check_label_count(labels)
    return labels


def check_label_count(labels: Sequence[str]) -> None:
    """Fewer than two labels is a usage error: the probabilities are a softmax over the labels, so one label's is
    always 1 and tells nothing."""
    if len(labels) < 2:
        raise UsageError(f"classify needs at least two labels, and got one ({labels[0]!r}): its probability would "
                         "always be 1", hint='give the alternatives too: --labels "cat,dog" (with --truth-from-dirs, '
                                             "at least two class folders)")


def classification_prompt(template: str, labels: Sequence[str]) -> str:
    """The question, with `{labels}` replaced by the labels joined by ", "."""
    return template.replace("{labels}", ", ".join(labels))


def scored_text(prompt: str, label: str) -> str:
    return prompt + ("" if prompt[-1:].isspace() else " ") + label


@dataclass(frozen=True)
class LabelScores:
    label: str
    scores: dict[str, float]          # probability per label, in the order given


@dataclass(frozen=True)
class LabelJob:
    """One image to classify, with its ground truth where it has one (--truth-from-dirs: its parent folder's name),
    kept in its record, a success or a failure. The truth is not part of the --resume key."""

    subject: Subject
    truth: str | None = None

    def key(self) -> str:
        return input_key(self.subject.images, self.subject.together, None)

    def carried(self) -> dict[str, str]:
        """What the job's record carries beyond the model's answer: its truth."""
        return {} if self.truth is None else {"truth": self.truth}

    def failure(self, message: str) -> Failure:
        return Failure(self.subject, message, self.carried())


def labels_from_truths(truths: Sequence[str]) -> list[str]:
    """--truth-from-dirs without --labels: the sorted distinct folder names (two at least)."""
    labels = sorted(set(truths))
    check_label_count(labels)
    return labels


def truths_outside(truths: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The truths (sorted, once each) that are not among the labels: images no answer can classify right."""
    return sorted(set(truths) - set(labels))


def label_continuations(tokenizer: Any, prompt: str, labels: Sequence[str]) -> list[list[int]]:
    """The token ids each label adds after the prompt's tokens, in the tokenization of the whole scored text."""
    base = tokenizer(prompt, add_special_tokens=True).input_ids
    continuations = []
    for label in labels:
        full = tokenizer(scored_text(prompt, label), add_special_tokens=True).input_ids
        if full[:len(base)] != base:
            raise _BoundaryMerge(label)  # the label merged with the prompt's last token: "after the prompt" is void
        if len(full) == len(base):
            raise UsageError(f"label {label!r} adds no tokens to the prompt")
        continuations.append(full[len(base):])
    return continuations


class _BoundaryMerge(Exception):
    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


def score_labels(
    checkpoint: Checkpoint,
    images: Sequence[Image.Image],
    question: str,
    labels: Sequence[str],
    normalize: str = "sum",
) -> list[LabelScores]:
    """Scores of every label for every image. The images and the prompt run through the model together, once; then
    each label's tokens continue from that cache, which is cut back to the prompt after each label: the memory held
    is the prompt's cache and one label's tokens, whatever the number of labels."""
    import torch

    from llavanext_cli.model.loading import eager_forward
    from llavanext_cli.engine.prefix_cache import cut_back, new_cache

    processor = checkpoint.processor
    tokenizer = processor.tokenizer
    model = checkpoint.model
    prompt = checkpoint.prompt.format.render(single_image_conversation(question))
    try:
        continuations = label_continuations(tokenizer, prompt, labels)
    except _BoundaryMerge as merge:
        raise UsageError(f"label {merge.label!r} merges with the end of the prompt when tokenized",
                         hint="end the prompt with a space or punctuation, or change the label") from merge

    from llavanext_cli.model.preprocessing import prepare_inputs

    inputs = prepare_inputs(processor, [prompt] * len(images), [[image] for image in images])
    inputs = inputs.to(model.device)
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(checkpoint)
    with torch.inference_mode(), eager_forward(model):
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (images, vocab)
        del out
        prompt_length = mask.shape[1]
        prompt_lengths = mask.sum(-1)
        count = len(images)
        totals = torch.zeros(count, len(labels), dtype=torch.float64)
        for index, tokens in enumerate(continuations):
            totals[:, index] = first[:, tokens[0]].double().cpu()
            if len(tokens) > 1:
                try:
                    totals[:, index] += _continuation_log_probs(model, cache, mask, prompt_lengths, tokens)
                finally:
                    cut_back(cache, prompt_length)
    lengths = torch.tensor([len(tokens) for tokens in continuations], dtype=torch.float64)
    if normalize == "mean":
        totals = totals / lengths
    results = []
    for probabilities in totals.softmax(dim=-1).tolist():
        best = max(range(len(labels)), key=lambda i: probabilities[i])
        results.append(LabelScores(label=labels[best], scores=dict(zip(labels, probabilities))))
    return results


def _continuation_log_probs(model: Any, cache: Any, prompt_mask: Any, prompt_lengths: Any,
                            tokens: Sequence[int]) -> Any:
    """Sum of log p(token j | prompt, tokens < j) for j >= 1 of one label's tokens, for every image, continuing from
    the prompt's cache (which this grows by the label's tokens: the caller cuts it back). Returns (images,) float64."""
    import torch

    count = prompt_mask.shape[0]
    device = prompt_mask.device
    feed = torch.tensor([list(tokens[:-1])] * count, device=device)  # the last token is only ever a target
    targets = torch.tensor([list(tokens[1:])] * count, device=device)
    attention = torch.cat([prompt_mask, torch.ones_like(feed)], dim=-1)
    positions = prompt_lengths[:, None] + torch.arange(feed.shape[1], device=device)[None, :]
    logits = model(input_ids=feed, attention_mask=attention, position_ids=positions, use_cache=True,
                   **with_cache(model, cache)).logits
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return picked.sum(-1).double().cpu()


def classify_inputs(
    checkpoint: Checkpoint,
    jobs: Sequence[LabelJob],
    question: str,
    labels: Sequence[str],
    normalize: str = "sum",
    batch_size: int = 1,
    fetching: ImageFetching = ImageFetching(),
) -> Iterator[Record]:
    """One record per job, in order: a Classification, or a Failure for an image that cannot be read (both with
    the job's truth, where it has one). Out of memory, a batch of images is halved and scored again, down to one
    image; an image that does not fit alone is an error record ("out of memory ..."), and the run goes on."""
    if checkpoint.device_type == "cpu":
        from llavanext_cli.engine.concurrency import use_cpu_cores

        use_cpu_cores(workers=1)
    checkpoint.load()  # before any record: a checkpoint that fails to load writes none
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        records: list[Record | None] = []
        ready: list[tuple[int, LabelJob, Image.Image]] = []
        for job in batch:
            try:
                ready.append((len(records), job, fetching.load(job.subject.images[0])))
                records.append(None)
            except InputError as exc:
                records.append(job.failure(exc.message))
        for (index, job, _), result in zip(ready, _score_halving(checkpoint, ready, question, labels, normalize)):
            records[index] = (job.failure(result) if isinstance(result, str) else
                              Classification(job.subject, result.label, result.scores, checkpoint.model_id,
                                             truth=job.truth))
        yield from (record for record in records if record is not None)


def _score_halving(checkpoint: Checkpoint, ready: list[tuple[int, LabelJob, Image.Image]], question: str,
                   labels: Sequence[str], normalize: str) -> list[LabelScores | str]:
    """score_labels over these images; out of memory, over each half in turn, down to one image, whose result is
    then the error's message."""
    from llavanext_cli.engine.generation import OUT_OF_MEMORY, is_out_of_memory, release_memory

    if not ready:
        return []
    try:
        return list(score_labels(checkpoint, [image for _, _, image in ready], question, labels, normalize))
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    release_memory()
    if len(ready) == 1:
        return [OUT_OF_MEMORY]
    half = len(ready) // 2
    return (_score_halving(checkpoint, ready[:half], question, labels, normalize)
            + _score_halving(checkpoint, ready[half:], question, labels, normalize))
