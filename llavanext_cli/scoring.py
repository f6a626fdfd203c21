"""Zero-shot classification by scoring each label as the assistant's answer (teacher forcing).

For label L the scored text is `prompt + L`, with one space between them unless the prompt ends in whitespace; its
score is the sum (or, with normalize="mean", the mean) of the log-probabilities of the tokens after the prompt's
tokens, and the label probabilities are the softmax of the scores. Each image and prompt run through the model
once: the prompt's KV cache is expanded over the labels, and every label continuation is scored in one batched
forward pass on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from llavanext_cli.cache_api import cache_of, with_cache
from llavanext_cli.checkpoint import Checkpoint
from llavanext_cli.errors import InputError, UsageError
from llavanext_cli.images import ImageFetching
from llavanext_cli.prompts import single_image_conversation
from llavanext_cli.records import Classification, Failure, Record, Subject, classification_key

# Label rows scored per forward pass on top of one prompt (bounds the expanded KV cache and the logits).
MAX_LABEL_ROWS = 64


def parse_labels(text: str | None = None, lines: Sequence[str] | None = None) -> list[str]:
    """Labels from "a,b,c" or from a file's lines (`#` comments and blank lines skipped); empty or duplicate
    labels are usage errors."""
    if lines is not None:
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
        return classification_key(self.subject)

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
    """Scores of every label for every image; the images run through the model together, once."""
    import torch

    processor = checkpoint.processor
    tokenizer = processor.tokenizer
    model = checkpoint.model
    prompt = checkpoint.prompt.format.render(single_image_conversation(question))
    try:
        continuations = label_continuations(tokenizer, prompt, labels)
    except _BoundaryMerge as merge:
        raise UsageError(f"label {merge.label!r} merges with the end of the prompt when tokenized",
                         hint="end the prompt with a space or punctuation, or change the label") from None

    from llavanext_cli.preprocessing import prepare_inputs

    inputs = prepare_inputs(checkpoint, [prompt] * len(images), [[image] for image in images])
    inputs = inputs.to(model.device)
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (images, vocab)
    prompt_cache = cache_of(out)
    prompt_lengths = mask.sum(-1)

    count = len(images)
    totals = torch.zeros(count, len(labels), dtype=torch.float64)
    for index, tokens in enumerate(continuations):
        totals[:, index] = first[:, tokens[0]].double().cpu()
    longest = max(len(tokens) for tokens in continuations)
    if longest > 1:
        chunk = max(1, MAX_LABEL_ROWS // count)
        for start in range(0, len(labels), chunk):
            part = continuations[start:start + chunk]
            totals[:, start:start + len(part)] += _continuation_log_probs(
                model, prompt_cache, mask, prompt_lengths, part, tokenizer.pad_token_id, last_chunk=start + chunk
                >= len(labels))
    lengths = torch.tensor([len(tokens) for tokens in continuations], dtype=torch.float64)
    if normalize == "mean":
        totals = totals / lengths
    results = []
    for probabilities in totals.softmax(dim=-1).tolist():
        best = max(range(len(labels)), key=lambda i: probabilities[i])
        results.append(LabelScores(label=labels[best], scores=dict(zip(labels, probabilities))))
    return results


def _continuation_log_probs(model: Any, prompt_cache: Any, prompt_mask: Any, prompt_lengths: Any,
                            continuations: Sequence[Sequence[int]], pad_id: int, last_chunk: bool) -> Any:
    """Sum of log p(token j | prompt, tokens < j) for j >= 1 of each continuation, on top of the prompt cache.
    Returns (images, labels) float64."""
    import copy

    import torch

    count = prompt_mask.shape[0]
    labels = len(continuations)
    width = max(len(tokens) for tokens in continuations) - 1  # the last token is only ever a target
    if width == 0:
        return torch.zeros(count, labels, dtype=torch.float64)
    device = prompt_mask.device
    inputs = torch.full((labels, width), pad_id if pad_id is not None else 0, dtype=torch.long)
    targets = torch.zeros(labels, width, dtype=torch.long)
    valid = torch.zeros(labels, width, dtype=torch.bool)
    for row, tokens in enumerate(continuations):
        feed = tokens[:-1]
        inputs[row, :len(feed)] = torch.tensor(feed)
        targets[row, :len(feed)] = torch.tensor(tokens[1:])
        valid[row, :len(feed)] = True
    cache = prompt_cache if last_chunk else copy.deepcopy(prompt_cache)
    cache.batch_repeat_interleave(labels)  # row i * labels + k: image i, label k
    ids = inputs.repeat(count, 1).to(device)
    attention = torch.cat([prompt_mask.repeat_interleave(labels, dim=0), valid.repeat(count, 1).to(device).long()],
                          dim=-1)
    positions = prompt_lengths.repeat_interleave(labels)[:, None] + torch.arange(width, device=device)[None, :]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                       use_cache=True, **with_cache(model, cache)).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.repeat(count, 1).to(device)[..., None])[..., 0]
    picked = picked.masked_fill(~valid.repeat(count, 1).to(device), 0.0)
    return picked.sum(-1).double().cpu().view(count, labels)


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
    the job's truth, where it has one)."""
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
        if ready:
            results = score_labels(checkpoint, [image for _, _, image in ready], question, labels, normalize)
            for (index, job, _), result in zip(ready, results):
                records[index] = Classification(job.subject, result.label, result.scores, checkpoint.model_id,
                                                truth=job.truth)
        yield from (record for record in records if record is not None)
