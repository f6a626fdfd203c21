"""`llava ask IMAGES... -q QUESTION` and `llava ask --questions FILE.jsonl`"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.errors import UsageError


def ask(
    images: opt.ImagesArg = None,
    question: Annotated[Optional[list[str]], typer.Option(
        "-q", "--question", help="The question to ask about each image; repeat it for several questions (one "
        "record per image and question, each image encoded once for all of them).", show_default=False)] = None,
    together: Annotated[bool, typer.Option("--together", help="Ask one question about all the images at once "
                                                              "(one multi-image prompt, one record).")] = False,
    questions: Annotated[Optional[str], typer.Option(
        "--questions", help="A JSONL file (or - for stdin) of {\"image\" or \"images\", \"question\", ...} lines; "
        "other keys are copied into each record.", show_default=False)] = None,
    recursive: opt.RecursiveOpt = False,
    model: opt.ModelOpt = None,
    server: opt.ServerOpt = None,
    prompt_format: opt.PromptFormatOpt = None,
    dtype: opt.DtypeOpt = None,
    quant: opt.QuantOpt = None,
    quant_type: opt.QuantTypeOpt = None,
    attn: opt.AttnOpt = None,
    device: opt.DeviceOpt = None,
    batch_size: opt.BatchSizeOpt = None,
    workers: opt.WorkersOpt = None,
    max_new_tokens: opt.MaxNewTokensOpt = None,
    temperature: opt.TemperatureOpt = None,
    top_p: opt.TopPOpt = None,
    num_beams: opt.NumBeamsOpt = None,
    seed: opt.SeedOpt = None,
    output_format: opt.FormatOpt = None,
    output: opt.OutputOpt = None,
    resume: opt.ResumeOpt = False,
    schema: opt.SchemaOpt = None,
    sidecar: opt.SidecarOpt = False,
    overwrite: opt.OverwriteOpt = False,
    prefix: opt.PrefixOpt = None,
    suffix: opt.SuffixOpt = None,
    fast_decode: opt.FastDecodeOpt = None,
    compile: opt.CompileOpt = None,
    max_memory: opt.MaxMemoryOpt = None,
    memory_check: opt.MemoryCheckOpt = None,
    config: opt.ConfigOpt = None,
    offline: opt.OfflineOpt = None,
    verbose: opt.VerboseOpt = False,
) -> int:
    """Answer a question about each image, about several images at once (--together), or a whole VQA set
    (--questions).

    Examples:

      llava ask sign.jpg -q "What does the sign say?"

      llava ask photos/ -q "What is it?" -q "How many people?" -q "Indoors?" -o answers.jsonl

      llava ask before.jpg after.jpg --together -q "What changed between these pictures?"

      llava ask --questions vqa.jsonl -o answers.jsonl --batch-size 8

      llava ask dataset/ -q "List the objects in this image, comma-separated." --sidecar
    """
    flags = opt.model_flags(locals())
    from llavanext_cli.io.questions import check_questions
    from llavanext_cli.cli.batch import answering, command_model, run_batch
    from llavanext_cli.io.questions import PromptJob, open_questions
    from llavanext_cli.io.dataset_outputs import DataSetFlags
    from llavanext_cli.io.inputs import expand_inputs, no_input_images
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.settings import resolve_settings

    if questions is not None and (question is not None or images or together):
        raise UsageError("--questions takes its images and questions from the file: drop IMAGES, -q and --together")
    if questions is None:
        question = check_questions(question)
        if not images:
            raise no_input_images()
    model = command_model(resolve_settings(flags, config), server)
    records_of = answering(model, schema)
    if questions is not None:
        jobs = open_questions(questions, sys.stdin)
    else:
        found = expand_inputs(images, recursive=recursive, stdin=sys.stdin)
        subjects = [Subject(tuple(found), together=True)] if together else [Subject.of(image) for image in found]
        jobs = [PromptJob(subject, text) for subject in subjects for text in question]  # image-major
    data_set = DataSetFlags(sidecar=sidecar, overwrite=overwrite, prefix=prefix, suffix=suffix)
    return run_batch(model, jobs, records_of, output=output, resume=resume, verbose=verbose, data_set=data_set,
                     streams=schema is None)
