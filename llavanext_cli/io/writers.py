"""Where records go: the writers (a format's sink on stdout or in an output file written safely, files of appended
JSON lines), the output checked before a run, the lock that keeps two runs off one file, and reading a jsonl file
back for --resume."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from llavanext_cli.errors import UsageError
from llavanext_cli.io.formats import APPENDED_FORMATS, RECORD_FORMATS
from llavanext_cli.io.records import JsonRecord, Record, csv_columns, csv_rows, text_line


def records_to_csv(records: list[JsonRecord]) -> str:
    rows = csv_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class RecordWriter:
    """Records in one format on a stream: jsonl (imagefolder: its lines) and text as each record arrives (flushed),
    json and csv whole at the end. The text format carries answers only (people read failures on stderr)."""

    def __init__(self, stream: IO[str], fmt: str, many: bool = True, with_prompt: bool = False):
        self.stream = stream
        self.fmt = fmt
        self.many = many
        self.with_prompt = with_prompt
        self.kept: list[JsonRecord] = []

    def write(self, record: JsonRecord) -> None:
        if self.fmt in ("json", "csv"):
            self.kept.append(record)
            return
        if self.fmt in APPENDED_FORMATS:
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif "error" not in record:
            self.stream.write(text_line(record, self.many, self.with_prompt) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.fmt == "json":
            json.dump(self.kept, self.stream, ensure_ascii=False, indent=2)
            self.stream.write("\n")
        elif self.fmt == "csv":
            self.stream.write(records_to_csv(self.kept))
        self.stream.flush()


class Writer(Protocol):
    """Where a run's records go, one after another: a format's sink, an imagefolder's metadata, a shard, the caption
    files beside the images. `write` may turn a record into another (a caption file that cannot be written makes a
    success a failure), which the next writer gets."""

    def write(self, record: Record) -> Record: ...

    def close(self, complete: bool = True) -> None: ...


class AppendedLines:
    """A file of JSON lines that records are appended to (flushed one complete line at a time, so an interrupted
    run keeps what it finished), opened on its first line: a run that makes none leaves the file as it was. What a
    record's line is, is the subclass's `line` (None: no line)."""

    def __init__(self, path: Path):
        self.path = path
        self._stream: IO[str] | None = None

    def line(self, record: Record) -> JsonRecord | None:
        raise NotImplementedError

    def write(self, record: Record) -> Record:
        made = self.line(record)
        if made is None:
            return record
        if self._stream is None:
            try:
                end_on_a_whole_line(self.path)  # a line is never glued to what an interrupted run left
                self._stream = open(self.path, "a", encoding="utf-8", newline="")
            except OSError as exc:
                raise UsageError(f"cannot write -o {self.path}: {exc.strerror or exc}") from exc
        self._stream.write(json.dumps(made, ensure_ascii=False) + "\n")
        self._stream.flush()
        return record

    def close(self, complete: bool = True) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class RecordSink:
    """Records in one of the formats, on stdout or in -o FILE. jsonl files are appended and flushed record by record,
    so an interrupted run keeps everything finished; json and csv files are written whole to a temporary file and
    renamed, so they are complete or absent. Nothing is opened before the first record (a run that fails before it
    leaves the output as it was)."""

    def __init__(self, output: Path | None, fmt: str, many: bool, with_prompt: bool = False):
        if fmt not in RECORD_FORMATS:
            raise UsageError(f"unknown output format {fmt!r}: expected {', '.join(RECORD_FORMATS)}")
        self.output = output
        self.fmt = fmt
        self.many = many
        self.with_prompt = with_prompt
        self._writer: RecordWriter | None = None
        self._temporary: Path | None = None

    def _open(self) -> RecordWriter:
        output = self.output
        try:
            if output is None:
                stream: IO[str] = sys.stdout
            elif self.fmt in ("json", "csv"):
                self._temporary = create_temporary(output)
                stream = open(self._temporary, "w", encoding="utf-8", newline="")
            elif self.fmt in APPENDED_FORMATS:
                end_on_a_whole_line(output)  # a record is never glued to what an interrupted run left
                stream = open(output, "a", encoding="utf-8", newline="")
            else:
                stream = open(output, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError(f"cannot write -o {output}: {exc.strerror or exc}") from exc
        return RecordWriter(stream, self.fmt, many=self.many, with_prompt=self.with_prompt)

    def write(self, record: Record) -> Record:
        if self._writer is None:
            self._writer = self._open()
        self._writer.write(record.to_json())
        return record

    def close(self, complete: bool = True) -> None:
        """Finish the output (a complete run with no record still writes an empty json array or csv header); an
        incomplete json / csv run leaves no file behind."""
        if self._writer is None:
            if not complete:
                return
            self._writer = self._open()
        stream = self._writer.stream
        try:
            if complete or self._temporary is None:
                self._writer.finish()
            if complete and self._temporary is not None:
                os.fsync(stream.fileno())  # on the disk before the rename, as write_atomically
        finally:
            if stream is not sys.stdout:
                stream.close()
        if self._temporary is not None:
            if complete:
                os.replace(self._temporary, self.output)
            else:
                self._temporary.unlink(missing_ok=True)


def create_temporary(path: Path) -> Path:
    """A new empty hidden file beside `path` (`.NAME.XXXXXXXX.tmp`), to be renamed over it once written. Created with
    the permissions a plain `open` gives (0666 less the umask), not mkstemp's 0600: the finished file is read by other
    users and programs (a trainer in a container) like any other."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def usual_file_mode() -> int:
    """The permissions a plain `open` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, text: str) -> None:
    """Write a whole file (UTF-8) through a temporary file in the same folder renamed over it: a reader finds the old
    file or the new one, never a part of one; a failure leaves no temporary file behind."""
    temporary = create_temporary(path)
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on the disk before the rename: a crash leaves the old file or the new one
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> None:
    """Open the output for appending now (and remove it again if that created it), so that an output the file system
    refuses fails before any weights load (os.access says yes to root where a read-only mount says no)."""
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write -o {path}: {exc.strerror or exc}") from exc
    if not existed:
        path.unlink(missing_ok=True)


def end_on_a_whole_line(path: Path) -> None:
    """Make a file that lines are appended to end on a whole line: a last line cut off by an interruption (not
    JSON) is dropped; a whole last line without its newline gets one. Called with the output locked."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if not size:
        return
    with open(path, "r+b") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            handle.truncate(start)
        else:
            handle.write(b"\n")


def read_finished_keys(path: Path, key_of: Callable[[JsonRecord], str | None], repair: bool = True) -> set[str]:
    """--resume: the keys of the success records already in a jsonl file, which (with `repair`) is first made to end
    on a whole line, so that appending continues on a clean one; without, a last line cut off is left out (a
    data-parallel run's other processes read what its main one repaired)."""
    if not path.exists():
        return set()
    if repair:
        end_on_a_whole_line(path)
    data = path.read_bytes()
    keys = set()
    lines = data.decode("utf-8", errors="replace").splitlines()
    if lines and not data.endswith(b"\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()  # cut off by an interruption: not a record
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"--resume: {path}:{number} is not a JSON record",
                             hint="resume needs the jsonl file a previous run wrote") from exc
        key = key_of(record) if isinstance(record, dict) else None
        if key is not None:
            keys.add(key)
    return keys


def lock_path(output: Path) -> Path:
    """The lock file of an output: hidden, beside it."""
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """An exclusive lock on an output file for the length of a run, so that a second run appending to the same file
    fails at once instead of interleaving its lines (filelock: flock on Unix, the Windows lock elsewhere, on a
    hidden lock file beside the output, removed when the run ends)."""

    def __init__(self, path: Path):
        from filelock import FileLock, Timeout

        self.path = path
        self._lock: Any = FileLock(lock_path(path), timeout=0)
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise UsageError(f"another llava run is writing to {path}",
                             hint="wait for it to finish, or choose another -o file") from exc
        except OSError as exc:
            raise UsageError(f"cannot write -o {path}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        if self._lock is not None:
            # Removed while still held: a run that opened it meanwhile finds the file unlinked and starts over.
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


def check_output(output: Path | None, fmt: str, resume: bool, lock: bool = True) -> OutputLock | None:
    """Fail fast on an output that cannot be written, before any weights load; lock a file that records are
    appended to (unless not `lock`), so that a second run on the same file refuses instead of interleaving."""
    if resume and output is None:
        raise UsageError("--resume needs -o FILE (the jsonl file of the interrupted run)")
    if resume and fmt not in APPENDED_FORMATS:
        raise UsageError(f"--resume works on jsonl output, not {fmt}", hint="use -o FILE.jsonl or --format jsonl")
    if output is None:
        return None
    if output.is_dir():
        raise UsageError(f"-o {output} is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {output}: directory {parent} does not exist")
    check_writable(output)
    # json / csv are written to a temporary file and renamed: only an appended file (jsonl, an imagefolder's
    # metadata.jsonl) needs the lock.
    return OutputLock(output) if lock and fmt in APPENDED_FORMATS else None
