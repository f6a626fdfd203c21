"""Training-set outputs, the two layouts image-model trainers read (the contract's "Data sets"):

- sidecar captions (`--sidecar`): each answer in `STEM.txt` beside its image, as kohya-ss sd-scripts, OneTrainer,
  SimpleTuner and ai-toolkit read them; an image that has one is done (a rerun is the resume);
- a Hugging Face imagefolder (`--format imagefolder -o DIR/metadata.jsonl`): one line per success,
  `{"file_name": the image's path relative to DIR, "text" | "label": ...}`, which
  `datasets.load_dataset("imagefolder", data_dir=DIR)` reads (datasets 3.4 or newer: the metadata file is the list
  of examples, so an image that failed, and has no line, is simply not in the data set); an image that has a line
  is done (a rerun is the resume), and an image has one line, never two (--overwrite replaces it).

What is checked before any work (and refused with a UsageError, exit 2), what is skipped, and how each record is
written. No terminal here: the command layer prints."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.errors import UsageError
from llavanext_cli.io.images import is_url
from llavanext_cli.io.records import DATA_KEY, Failure, JsonRecord, Record, Subject, input_key
from llavanext_cli.io.writers import AppendedLines, create_temporary, read_finished_keys, write_atomically

SIDECAR_EXTENSION = ".txt"
METADATA_NAME = "metadata.jsonl"
# The metadata files datasets' imagefolder reads (one kind per folder).
_OTHER_METADATA_NAMES = ("metadata.csv", "metadata.parquet")


# --- sidecar captions ----------------------------------------------------------------------------------------


def sidecar_path(image: str) -> Path:
    """The caption file of a local image: the same folder and stem, `.txt` (`photos/dog.1.jpg` ->
    `photos/dog.1.txt`, as the trainers look it up)."""
    path = Path(image)
    return path.with_name(path.stem + SIDECAR_EXTENSION)


def _is_its_own_caption_file(image: str) -> bool:
    """An image named explicitly whatever its extension, `notes.txt`: its caption file would be itself."""
    return os.path.normcase(os.path.abspath(sidecar_path(image))) == os.path.normcase(os.path.abspath(image))


def one_line(text: str) -> str:
    """An answer as one line: its line breaks (and the blank lines of paragraphs) become one space. sd-scripts reads
    only a caption file's first line and OneTrainer can take each line as a caption of its own."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class Sidecars:
    """`--sidecar`: each answer also written to STEM.txt beside its image, as `prefix + answer + suffix` (verbatim:
    `--prefix "sks dog, "` brings its own comma and space), on one line, UTF-8, no trailing newline, through a
    temporary file renamed over it. An image that already has one is skipped unless `overwrite`."""

    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False

    def content(self, text: str) -> str:
        return self.prefix + one_line(text) + self.suffix

    def check_jobs(self, jobs: Sequence[Any]) -> None:
        """Refuse, before any work, what one caption file per image cannot hold: one answer about several images
        (ask --together), several answers about one image (ask -q A -q B, a --questions file naming an image
        twice), and two images whose caption files would be the same (cat.jpg and cat.png)."""
        owners: dict[str, tuple[str, Subject]] = {}
        for job in jobs:
            subject: Subject = job.subject
            if subject.together:
                raise UsageError("--sidecar writes one caption file per image, and --together makes one answer "
                                 "about several images", hint="drop --together, or write -o answers.jsonl instead")
            image = subject.images[0]
            if is_url(image):
                continue
            where = os.path.normcase(os.path.abspath(sidecar_path(image)))
            if where in owners:
                other, other_subject = owners[where]
                if other_subject == subject:
                    raise UsageError(f"--sidecar writes one caption file per image, and {image} is asked more than "
                                     "one question",
                                     hint="ask one question per run with --sidecar, or write -o answers.jsonl")
                raise UsageError(f"--sidecar: {other} and {image} would both write their caption to "
                                 f"{sidecar_path(image)}", hint="rename one of them, or caption them in separate runs")
            owners[where] = (image, subject)

    def has_caption(self, subject: Subject) -> bool:
        """Done already: its caption file exists (and --overwrite was not given)."""
        image = subject.images[0]
        if self.overwrite or is_url(image) or _is_its_own_caption_file(image):
            return False
        try:
            return sidecar_path(image).is_file()
        except OSError:  # a name the system refuses: the image's own error record says why
            return False

    def refusals(self, subjects: Iterable[Subject]) -> dict[Subject, str]:
        """The subjects that cannot get a caption file, and why, found before any work: URLs (no folder to write
        in), and images whose folder refuses a new file (each folder tried once)."""
        refused: dict[Subject, str] = {}
        folders: dict[Path, str | None] = {}
        for subject in subjects:
            image = subject.images[0]
            if is_url(image):
                refused[subject] = ("--sidecar needs a local image file: a URL has no folder to write its caption "
                                    "file in (download it first)")
                continue
            path = sidecar_path(image)
            if _is_its_own_caption_file(image):
                refused[subject] = f"--sidecar: the caption file of {image} would be the image itself"
                continue
            folder = path.parent
            if folder not in folders:
                folders[folder] = _cannot_write_in(folder)
            if folders[folder] is not None:
                refused[subject] = f"cannot write its caption file {path}: {folders[folder]}"
        return refused

    def write(self, record: Record) -> Record:
        """A writer (writers.Writer) ahead of the run's sink: a success's caption file written; one that cannot be
        written makes the record an error record (the run goes on). Error records write nothing."""
        text = getattr(record, "text", None)
        if not record.ok or text is None:
            return record
        path = sidecar_path(record.subject.images[0])
        try:
            write_atomically(path, self.content(text))
        except OSError as exc:
            return Failure(record.subject, f"cannot write its caption file {path}: {exc.strerror or exc}",
                           getattr(record, "extra", {}))
        return record

    def close(self, complete: bool = True) -> None:
        """Caption files are written whole, one at a time: nothing is left open."""


def _cannot_write_in(folder: Path) -> str | None:
    """Why a new file cannot be created in a folder (None when it can, or when the folder does not exist: the image
    is missing and its own error says so)."""
    if not folder.is_dir():
        return None
    try:
        create_temporary(folder / "probe").unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# --- Hugging Face imagefolder ---------------------------------------------------------------------------------

# The columns a row is made of, which a --schema answer's properties never replace (they become "data.NAME").
_ROW_KEYS = frozenset({"file_name", "file_names", "prompt", "text", "label"})


def _inside(image: str, root: Path) -> str | None:
    """An image's path relative to `root` with POSIX separators; None when it is not inside. Compared as written
    (a symbolic link inside root counts as inside), then with links resolved (root given through a link)."""
    for resolve in (os.path.abspath, os.path.realpath):
        try:
            relative = os.path.relpath(resolve(image), resolve(root))
        except ValueError:  # another drive (Windows)
            continue
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep) and not os.path.isabs(relative):
            return Path(relative).as_posix()
    return None


@dataclass(frozen=True)
class ImageFolder:
    """`--format imagefolder -o DIR/metadata.jsonl`: a success's line is `{"file_name": path relative to DIR,
    "text": prefix + answer + suffix}` (`ask --together`: `"file_names": [...]`, which datasets loads as a list of
    images); where the run asks several prompts a `"prompt"` column comes before the answer; a --schema answer's
    top-level properties follow as columns; classify writes `"label"`. Failures write no line."""

    metadata: Path
    with_prompt: bool = False
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False

    @property
    def root(self) -> Path:
        return self.metadata.parent

    @staticmethod
    def check_output(output: Path | None) -> Path:
        """The output an imagefolder is written to: -o DIR/metadata.jsonl, the file name datasets looks for."""
        if output is None:
            raise UsageError("--format imagefolder writes DIR/metadata.jsonl beside the images",
                             hint="add -o DIR/metadata.jsonl, DIR being the folder that holds the images")
        if output.name != METADATA_NAME:
            raise UsageError(f"--format imagefolder writes a file named {METADATA_NAME} (the name datasets' "
                             f"imagefolder looks for), not {output.name}", hint=f"-o {output.with_name(METADATA_NAME)}")
        return output

    def other_metadata(self) -> list[Path]:
        """Metadata files of another kind in DIR: datasets refuses a folder that mixes them."""
        return [self.root / name for name in _OTHER_METADATA_NAMES if (self.root / name).exists()]

    def check_inputs(self, jobs: Sequence[Any]) -> None:
        """Every input must be a local image inside DIR (a line names it relative to DIR; datasets refuses paths
        that leave it): the first one that is not is refused, before any work."""
        for job in jobs:
            for image in job.subject.images:
                if is_url(image):
                    raise UsageError(f"--format imagefolder: {image} is a URL, not an image file in {self.root}",
                                     hint="download the images into the data set's folder first")
                if _inside(image, self.root) is None:
                    raise UsageError(f"--format imagefolder: {image} is not inside {self.root}, the folder of "
                                     f"{self.metadata.name}",
                                     hint=f"put the images under {self.root}, or write -o IMAGES_DIR/{METADATA_NAME}")

    def _names(self, images: Sequence[str]) -> list[str]:
        names = [_inside(image, self.root) for image in images]
        if None in names:  # check_inputs ran first
            raise ValueError(f"not inside {self.root}: {images}")
        return names  # type: ignore[return-value]

    def row(self, record: Mapping[str, Any]) -> JsonRecord | None:
        """The metadata line of a record's JSON (None for an error record)."""
        if "error" in record:
            return None
        if isinstance(record.get("images"), list):
            row: JsonRecord = {"file_names": self._names(record["images"])}
        else:
            row = {"file_name": self._names([record["image"]])[0]}
        if self.with_prompt and "prompt" in record:
            row["prompt"] = record["prompt"]
        if "label" in record:
            row["label"] = record["label"]
        else:
            row["text"] = self.prefix + str(record["text"]) + self.suffix
        data = record.get(DATA_KEY)
        if isinstance(data, dict):
            for name, value in data.items():
                row[f"{DATA_KEY}.{name}" if name in _ROW_KEYS else name] = value
        elif DATA_KEY in record:
            row[DATA_KEY] = data
        return row

    def _line_key(self, row: Mapping[str, Any], prompt: Any) -> str | None:
        """The input a line answers (records.input_key: its images, made paths again from DIR, and `prompt`)."""
        if isinstance(row.get("file_name"), str):
            names, together = [row["file_name"]], False
        elif isinstance(row.get("file_names"), list):
            names, together = [str(name) for name in row["file_names"]], True
        else:
            return None
        return input_key([str(self.root / name) for name in names], together,
                         prompt if isinstance(prompt, str) else None)

    def row_key(self, row: Mapping[str, Any]) -> str | None:
        """--resume: the input a metadata line answered (its prompt counts where the run asks several)."""
        return self._line_key(row, row.get("prompt") if self.with_prompt else None)

    def finished_keys(self, repair: bool = True) -> set[str]:
        """The keys of the inputs that have a line already (none with --overwrite: they are all done again);
        `repair`: see writers.read_finished_keys."""
        return set() if self.overwrite else read_finished_keys(self.metadata, self.row_key, repair)

    def keep_last_lines(self) -> None:
        """One line per input: where --overwrite (or a run killed before it could tidy up) left an input with
        several lines, only its last (the newest answer) is kept; the file rewritten whole, atomically, and only
        when there is something to remove. An input is its file name(s) and the prompt its line names, whatever
        this run asks (the lines of an earlier run of several questions stay apart); lines that name no input are
        kept as they are."""
        try:
            lines = self.metadata.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return
        keys: list[str | None] = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            keys.append(self._line_identity(row) if isinstance(row, dict) else None)
        last = {key: position for position, key in enumerate(keys) if key is not None}
        if len(last) == sum(key is not None for key in keys):
            return
        kept = [line for position, (line, key) in enumerate(zip(lines, keys)) if key is None or last[key] == position]
        write_atomically(self.metadata, "".join(kept))

    def _line_identity(self, row: Mapping[str, Any]) -> str | None:
        return self._line_key(row, row.get("prompt"))

    def job_key(self, job: Any) -> str:
        """The key of a job, as `row_key` gives it for the line the job's success writes."""
        return input_key(job.subject.images, job.subject.together,
                         getattr(job, "prompt", None) if self.with_prompt else None)

    def record_key(self, record: Mapping[str, Any]) -> str | None:
        """The key of a record (a data-parallel shard holds records): that of the line it writes; None for an error
        record."""
        row = self._shard_row(record)
        return None if row is None else self.row_key(row)

    def _shard_row(self, record: Mapping[str, Any]) -> JsonRecord | None:
        """The line of a record read back from a shard; None for an error record, or for a record no line can be
        made of (about an image outside DIR: a shard left by another command)."""
        try:
            return self.row(record)
        except (KeyError, ValueError):
            return None

    def merge_shards(self) -> list[JsonRecord]:
        """A data-parallel run's end (the main process, once every process is done): the records of the shards
        beside the metadata file, in input order, appended to it as lines (successes only); the shards removed.
        Returns the records merged (the failures among them decide the exit code)."""
        from llavanext_cli.io.sharding import merge_shards

        return merge_shards(self.metadata, self._shard_row)


class ImageFolderSink(AppendedLines):
    """An imagefolder's metadata.jsonl as a run's writer: a success's line appended as it comes; a failure writes no
    line (datasets loads only the images that have one), and a run with no success leaves no file (datasets would
    refuse an empty one)."""

    def __init__(self, folder: ImageFolder):
        super().__init__(folder.metadata)
        self.folder = folder

    def line(self, record: Record) -> JsonRecord | None:
        return self.folder.row(record.to_json()) if record.ok else None


# --- the flags --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSetFlags:
    """A command's training-set flags as given: --sidecar, --overwrite, --prefix, --suffix (classify has none of
    them; --format imagefolder is the format setting)."""

    sidecar: bool = False
    overwrite: bool = False
    prefix: str | None = None
    suffix: str | None = None

    def outputs(self, fmt: str, output: Path | None, with_prompt: bool,
                resume: bool = False) -> tuple[Sidecars | None, ImageFolder | None]:
        """The run's training-set outputs, checked against each other and the output format (before any work);
        `with_prompt`: the run asks several prompts (an imagefolder line then names its prompt)."""
        imagefolder = fmt == "imagefolder"
        if self.overwrite and not (self.sidecar or imagefolder):
            raise UsageError("--overwrite applies to the training-set outputs: it does again the images that already "
                             "have a caption file (--sidecar) or a line in metadata.jsonl (--format imagefolder)",
                             hint="add --sidecar or --format imagefolder, or drop --overwrite")
        if self.overwrite and resume:
            raise UsageError("--overwrite does again what is done, --resume skips it: give one of them")
        if (self.prefix is not None or self.suffix is not None) and not (self.sidecar or imagefolder):
            given = "--prefix" if self.prefix is not None else "--suffix"
            raise UsageError(f"{given} applies to the training-set outputs: the caption files (--sidecar) and the "
                             "text column of --format imagefolder", hint="add --sidecar or --format imagefolder")
        prefix, suffix = self.prefix or "", self.suffix or ""
        sidecars = Sidecars(prefix, suffix, self.overwrite) if self.sidecar else None
        folder = (ImageFolder(ImageFolder.check_output(output), with_prompt, prefix, suffix, self.overwrite)
                  if imagefolder else None)
        return sidecars, folder
