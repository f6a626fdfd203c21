"""What the benchmark scripts share: the repository's paths, the tiny checkpoint they run on (built here unless
`-m` names one), a checkpoint opened quietly, and a folder of images of mixed sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCES = sorted((REPO / "examples").glob("*")) + sorted((REPO / "tests" / "data" / "images").glob("*"))


def tiny_model(workdir: str | Path, given: str | None) -> str:
    """The checkpoint to measure: `given` (-m), else the tiny LLaVA-NeXT one built in `workdir` by init-model."""
    if given:
        return given
    model = str(Path(workdir) / "tiny")
    subprocess.run([sys.executable, "-m", "llavanext_cli", "init-model", str(REPO / "configs" / "tiny-llava-next.yaml"),
                    model], check=True, capture_output=True)
    return model


def open_quietly(model: str):
    """The tool's own Checkpoint for `model`, library logging off (the weights load on first use)."""
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.model.loading import configure_library_logging
    from llavanext_cli.io.settings import load_settings

    configure_library_logging(False)
    return open_checkpoint(load_settings({"model": model}, env={}))


def make_images(folder: Path, count: int) -> None:
    """`count` images of mixed sizes, aspect ratios and formats, cut and scaled from the repository's images."""
    from PIL import Image

    shapes = [(640, 480), (480, 640), (1024, 768), (300, 300), (1200, 400), (400, 1200), (800, 800), (2000, 1500),
              (350, 600), (900, 500), (224, 224), (1600, 900)]
    for index in range(count):
        source = Image.open(SOURCES[index % len(SOURCES)]).convert("RGB")
        width, height = shapes[index % len(shapes)]
        image = source.resize((width, height))
        suffix = ".jpg" if index % 2 else ".png"
        image.save(folder / f"{index:03d}{suffix}", quality=90)
