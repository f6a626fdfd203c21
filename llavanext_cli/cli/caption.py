"""`llava caption IMAGES...`"""

from __future__ import annotations

import sys

from llavanext_cli.cli import options as opt


def caption(
    images: opt.ImagesArg = None,
    prompt: opt.PromptOpt = None,
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
    """One description per image.

    Examples:

      llava caption photo.jpg

      llava caption photos/ --recursive -o captions.jsonl

      find . -name '*.jpg' | llava caption - --format jsonl | jq -r .text

      llava caption examples/chelsea.png -m ./tiny --max-new-tokens 12

      llava caption dataset/ --sidecar --prefix "sks dog, "

      llava caption dataset/ -r --format imagefolder -o dataset/metadata.jsonl --resume
    """
    flags = opt.model_flags(locals())
    from llavanext_cli.cli.batch import answering, command_model, run_batch
    from llavanext_cli.io.questions import PromptJob
    from llavanext_cli.io.dataset_outputs import DataSetFlags
    from llavanext_cli.io.inputs import expand_inputs, no_input_images
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.settings import resolve_settings

    if not images:
        raise no_input_images()
    model = command_model(resolve_settings(flags, config), server)
    records_of = answering(model, schema)
    text = prompt if prompt is not None else model.settings.caption_prompt
    jobs = [PromptJob(Subject.of(image), text) for image in expand_inputs(images, recursive=recursive, stdin=sys.stdin)]
    data_set = DataSetFlags(sidecar=sidecar, overwrite=overwrite, prefix=prefix, suffix=suffix)
    # A JSON answer is shown once it is whole: one cut short is an error, and its part must not reach stdout.
    return run_batch(model, jobs, records_of, output=output, resume=resume, verbose=verbose, data_set=data_set,
                     streams=schema is None)
