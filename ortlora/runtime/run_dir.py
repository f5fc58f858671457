"""A run directory that tells the truth: one run at a time, and its latest checkpoint is the one it wrote last.

RUN/
    ortlora-run.json        which checkpoint the run wrote last; marks the directory as ortlora-train's
    .ortlora-run.lock       held (flock) by the process training into RUN, released by the kernel at exit
    checkpoint-STEP/        see checkpoint.py
    config.json, log.jsonl, summary.json, loss.png
    tensorboard/            event files (--report-to tensorboard)

Checkpoint numbers alone do not tell which is current: a resume from an earlier checkpoint leaves
higher-numbered checkpoints of the abandoned branch behind. So checkpoints carry a write sequence number
(``seq`` in trainer_state.json, one more than any before it in the directory), and the record names the
latest checkpoint with its ``seq``: a resume sets the record to the checkpoint it resumes from, at the
highest ``seq`` the directory holds, so nothing written before it counts as newer. Readers (--resume,
ortlora-export, ortlora-generate) take the checkpoint of highest ``seq`` above the record's, else the
record's own: a kill between a checkpoint's rename into place and the record's update loses nothing.

The record also proves which files are the run's (ownership.py): config.json, summary.json and loss.png by
size and SHA-256 (a file about to be replaced is listed with both contents until the rename is done), log.jsonl
and TensorBoard's event files by their first bytes, as of the last checkpoint, and what follows them (the log's
JSON Lines records); each checkpoint by its own ortlora-files.json. Starting over (--overwrite, or a run killed
before its first checkpoint), resuming into the directory and --keep-last remove or replace only what this
proves; a directory holding anything else is refused before any work.

``RUN/best`` names the checkpoint of lowest eval loss. Each checkpoint's trainer_state.json records the
best so far (its step and eval loss; every new best is saved as a checkpoint), so the latest checkpoint
names the run's best, through kills and resumes alike, and --keep-last never removes it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from ortlora.errors import OrtloraError
from ortlora.files import read_json
from ortlora.output_dirs import check_output_dir
from ortlora.ownership import describe, describe_bytes, matches, read_record, unproven, write_atomic, write_record

RUN_STATE = "ortlora-run.json"
TRAINER_STATE = "trainer_state.json"  # a checkpoint's (checkpoint.py)
LOCK_FILE = ".ortlora-run.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER = "ortlora-train"  # the writer of a run directory and its checkpoints, in their records
LOG = "log.jsonl"
# What ortlora-train writes into a run directory besides checkpoints, TensorBoard's files and its lock.
RUN_FILES = ("config.json", LOG, "summary.json", "loss.png", RUN_STATE)
# Temporaries of a killed run, by the names ortlora gives them: removed at the next start (under the lock).
LEFTOVER_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-[\w-]+$|^\.(" + "|".join(map(re.escape, RUN_FILES))
                         + r")\.tmp-\w+$")
NAME_A_CHECKPOINT = "name a checkpoint directory (RUN/checkpoint-STEP) instead"
BEST = "best"  # RUN/best: the checkpoint of lowest eval loss
TENSORBOARD_DIR = "tensorboard"


def json_bytes(data) -> bytes:
    """JSON text as ortlora writes it; NaN and infinity become null."""
    return (json.dumps(_finite(data), indent=2, allow_nan=False) + "\n").encode()


def write_json(path: Path, data) -> None:
    """Write JSON atomically (a temporary file renamed over ``path``); NaN and infinity become null."""
    write_atomic(path, json_bytes(data))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- the record: the latest checkpoint, and the proof of the run's own files ------------------------------
def _load(run_dir: Path) -> dict:
    record = read_record(run_dir / RUN_STATE)
    return record if record and isinstance(record.get("files"), dict) else {"latest": None, "seq": 0, "files": {}}


def _save(run_dir: Path, record: dict) -> None:
    write_record(run_dir / RUN_STATE, record)


def _growing(run_dir: Path, files: dict) -> dict:
    """The log's and TensorBoard's files as they are now (their first bytes prove them from here on)."""
    found = {}
    log = run_dir / LOG
    if LOG in files and matches(log, files[LOG], _log_tail):
        found[LOG] = [{**describe(log), "grows": True}]
    board = run_dir / TENSORBOARD_DIR
    if board.is_dir() and not board.is_symlink():
        for path in board.iterdir():
            name = f"{TENSORBOARD_DIR}/{path.name}"
            if _event_file_known(path, files):
                found[name] = [{**describe(path), "grows": True}]
    return found


def _log_tail(data: bytes) -> bool:
    """What follows the recorded part of log.jsonl: its records, the last one perhaps torn by a kill."""
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if i == len(lines) - 1:
            return not line or line.startswith(b"{")
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not (isinstance(record, dict) and "kind" in record):
            return False
    return True


def _event_file_known(path: Path, files: dict) -> bool:
    """An event file this run's writer made: recorded by name, or by the suffix given to its writer."""
    name = f"{TENSORBOARD_DIR}/{path.name}"
    if name in files:
        return matches(path, files[name], lambda tail: True)
    suffixes = [k[len(TENSORBOARD_DIR) + 2:] for k in files if k.startswith(f"{TENSORBOARD_DIR}/*")]
    return any(path.name.endswith(s) for s in suffixes) and path.is_file() and not path.is_symlink()


def record_latest(run_dir: Path, checkpoint: Path | None, seq: int) -> None:
    record = _load(run_dir)
    record.update(latest=checkpoint.name if checkpoint else None, seq=seq)
    record["files"].update(_growing(run_dir, record["files"]))  # the logs' first bytes, as of this checkpoint
    _save(run_dir, record)


def write_owned(run_dir: Path, name: str, data: bytes, grows: bool = False) -> None:
    """Write one of the run's own files atomically, with the record proving it at every moment: listed with
    the old and the new content while the file is replaced, then with the new one alone."""
    record, new = _load(run_dir), {**describe_bytes(data), **({"grows": True} if grows else {})}
    path = run_dir / name
    if (path.exists() or path.is_symlink()) and not matches(path, record["files"].get(name, []),
                                                            _log_tail if name == LOG else None):
        raise OrtloraError(f"{path} is not the one ortlora-train wrote (it changed, or came in while the run went "
                           "on); it was left as it is: move it out of the run directory")
    record["files"][name] = [*record["files"].get(name, []), new]
    _save(run_dir, record)
    write_atomic(run_dir / name, data)
    record = _load(run_dir)
    record["files"][name] = [new]
    _save(run_dir, record)


def expect_event_files(run_dir: Path, suffix: str) -> None:
    """TensorBoard's writer is about to make a file whose name ends in ``suffix``: record it as the run's first."""
    record = _load(run_dir)
    record["files"][f"{TENSORBOARD_DIR}/*{suffix}"] = [{"size": 0, "sha256": describe_bytes(b"")["sha256"],
                                                       "grows": True}]
    _save(run_dir, record)


def mark_finished(run_dir: Path, finished: bool) -> None:
    """Whether the end of the run (summary.json, --keep-last's removals) is done, for a resume to complete it."""
    record = _load(run_dir)
    record["finished"] = finished
    _save(run_dir, record)


def finished(run_dir: Path) -> bool:
    return bool(_load(run_dir).get("finished"))


def _is_lock_file(path: Path) -> bool:
    """The lock file as ortlora-train leaves it: empty, or the process id of its last holder."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 20:
        return False
    text = path.read_bytes().strip()
    return not text or text.isdigit()


def unproven_in_run(run_dir: Path) -> list[str]:
    """Entries of a run directory that its record (and each checkpoint's) does not prove ortlora-train's."""
    record = read_record(run_dir / RUN_STATE)
    files = record.get("files") if record else None
    if not isinstance(files, dict):  # no record of ortlora-train's: nothing but a lock it left is its own
        return sorted(p.name for p in run_dir.iterdir() if not (p.name == LOCK_FILE and _is_lock_file(p)))
    strangers = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name == RUN_STATE or LEFTOVER_RE.match(name) and not entry.is_symlink():
            continue
        if name == LOCK_FILE:
            if not _is_lock_file(entry):
                strangers.append(name)
        elif CHECKPOINT_RE.match(name) and entry.is_dir() and not entry.is_symlink():
            strangers += [f"{name}/{inner}" for inner in unproven(entry, TRAINER)]
        elif name == TENSORBOARD_DIR and entry.is_dir() and not entry.is_symlink():
            strangers += [f"{name}/{p.name}" for p in sorted(entry.iterdir()) if not _event_file_known(p, files)]
        elif not matches(entry, files.get(name, []), _log_tail if name == LOG else None):
            strangers.append(name)
    return strangers


def _record(run_dir: Path) -> tuple[str | None, int] | None:
    """The record's latest checkpoint name and sequence number, None for runs of older versions."""
    state = run_dir / RUN_STATE
    if not state.is_file():
        return None
    record = read_json(state, NAME_A_CHECKPOINT)
    latest, seq = record.get("latest"), record.get("seq", 0)
    if latest is not None and not (isinstance(latest, str) and CHECKPOINT_RE.match(latest)) or type(seq) is not int:
        raise OrtloraError(f"{state} is damaged (latest {latest!r}, seq {seq!r}); {NAME_A_CHECKPOINT}")
    return latest, seq


def _checkpoints(run_dir: Path) -> list[tuple[int, int, Path]]:
    """(write sequence number, step, directory) of every checkpoint; 0 for checkpoints of older versions."""
    found = []
    for path in run_dir.iterdir():
        if (m := CHECKPOINT_RE.match(path.name)) and path.is_dir():
            try:
                seq = json.loads((path / TRAINER_STATE).read_bytes()).get("seq", 0)
            except (OSError, ValueError, AttributeError):
                seq = 0
            found.append((seq if type(seq) is int else 0, int(m.group(1)), path))
    return sorted(found)


def next_seq(run_dir: Path) -> int:
    """The write sequence number of the next checkpoint: above every checkpoint's and the record's."""
    record = _record(run_dir)
    return 1 + max([record[1] if record else 0] + [seq for seq, _, _ in _checkpoints(run_dir)])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the run wrote last (see the module's docstring); for runs without a record, the highest step."""
    record, checkpoints = _record(run_dir), _checkpoints(run_dir)
    if record is None:
        return max(checkpoints, key=lambda c: c[1])[2] if checkpoints else None
    latest, seq = record
    newer = [c for c in checkpoints if c[0] > seq]
    if newer:
        return newer[-1][2]
    if latest is not None and not (run_dir / latest).is_dir():
        raise OrtloraError(f"{run_dir / RUN_STATE} names checkpoint {latest!r}, which {run_dir} does not hold; "
                           f"{NAME_A_CHECKPOINT}")
    return run_dir / latest if latest else None


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of lowest eval loss, as the run's latest checkpoint records it (see the module's docstring)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise OrtloraError(f"{run_dir} holds no checkpoint, so no best one either")
    state = latest / TRAINER_STATE
    best = read_json(state, NAME_A_CHECKPOINT).get("best") if state.is_file() else None
    if best is None:
        raise OrtloraError(f"{run_dir} has no best checkpoint yet: no evaluation has run in it (train with evaluation "
                           f"data; --eval-every N evaluates during training); {NAME_A_CHECKPOINT}")
    if not (isinstance(best, dict) and type(best.get("step")) is int and best["step"] >= 0):
        raise OrtloraError(f"{state} is damaged (best {best!r}); {NAME_A_CHECKPOINT}")
    path = run_dir / f"checkpoint-{best['step']}"
    if not path.is_dir():
        raise OrtloraError(f"{run_dir}'s best checkpoint, {path.name} (eval loss {best.get('eval_loss')}), is gone; "
                           f"{NAME_A_CHECKPOINT}")
    return path


def remove_checkpoint(checkpoint: Path) -> bool:
    """--keep-last's removal, of a checkpoint proven ortlora's (False, and nothing removed, otherwise): renamed
    out of the way first (a leftover's name, which the next start removes), so a kill during the removal never
    leaves part of a checkpoint under a checkpoint's name."""
    if not checkpoint.is_dir():
        return True
    if checkpoint.is_symlink() or unproven(checkpoint, TRAINER):
        return False
    doomed = checkpoint.parent / f".{checkpoint.name}.tmp-removed-{os.getpid()}"
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def check_run_dir(out: Path, *, resuming_from: Path | None, overwrite: bool, reads: list[Path]) -> tuple[bool, bool]:
    """Refuse an --out that this run may not write, before any work: one holding anything that is not proven
    ortlora-train's (see the module's docstring), whatever the flags. Returns whether the run continues
    its own directory (a resume into the run directory of the checkpoint), and whether it starts the
    directory over: --overwrite, or a run of ours that stopped before its first checkpoint (nothing
    in it can be resumed, so nothing is lost)."""
    same_run = resuming_from is not None and out.resolve() == resuming_from.resolve().parent
    if (out / LOCK_FILE).is_file() and _is_lock_file(out / LOCK_FILE):
        _lock(out).close()  # a run training there now: say so, whatever else the directory holds
    unfinished = out.is_dir() and read_record(out / RUN_STATE) is not None and latest_checkpoint(out) is None
    check_output_dir(out, flag="--overwrite", replace=overwrite or same_run or unfinished, what=TRAINER,
                     reads=[] if same_run else reads, hint=f"continue that run with --resume {out}, or ",
                     proof=unproven_in_run)
    return same_run, (overwrite or unfinished) and not same_run


class RunDir:
    """The run directory of this process: locked for its life, cleaned of what killed runs left."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(path)
        self.removed_leftovers = self._remove_leftovers()

    def _remove_leftovers(self) -> int:
        """Half-written checkpoints and files of killed runs: none of them has an owner while we hold the lock."""
        leftovers = [p for p in self.path.iterdir() if LEFTOVER_RE.match(p.name) and not p.is_symlink()]
        for entry in leftovers:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return len(leftovers)

    def begin(self, *, start_over: bool, resume_from: Path | None, step: int) -> list[str]:
        """Make the directory this run's: start an earlier run over (--overwrite), continue from a
        checkpoint at ``step``, or mark a new one. Returns lines that tell the user what was done."""
        said = [f"removed {self.removed_leftovers} half-written entries left in {self.path} by a killed run"
                ] if self.removed_leftovers else []
        if start_over:
            self.start_over()
        if resume_from is not None:
            abandoned = self.continue_from(resume_from, step)
            if abandoned:
                span = abandoned[0] if len(abandoned) == 1 else f"{abandoned[0]} to {abandoned[-1]}"
                said.append(f"{span} in {self.path} belong to the run abandoned at {resume_from.name}; "
                            "the run's latest checkpoint is the one it writes last")
        else:
            if read_record(self.path / RUN_STATE) is None:
                record_latest(self.path, None, 0)
            write_owned(self.path, LOG, b"", grows=True)
        mark_finished(self.path, False)
        return said

    def start_over(self) -> None:
        """--overwrite: remove the previous run's checkpoints and files, each proven the run's, and nothing else."""
        strangers = unproven_in_run(self.path)
        if strangers:  # checked before the work began: something came in since
            raise OrtloraError(f"{self.path} holds {strangers[0]}, which ortlora-train did not write; "
                               "nothing was removed: choose an empty or new directory, or move it out")
        for entry in self.path.iterdir():
            if CHECKPOINT_RE.match(entry.name) and entry.is_dir():
                remove_checkpoint(entry)
            elif entry.name == TENSORBOARD_DIR and entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name in RUN_FILES and entry.name != RUN_STATE:
                entry.unlink()
        write_record(self.path / RUN_STATE, {"latest": None, "seq": next_seq(self.path) - 1, "files": {}})

    def continue_from(self, checkpoint: Path, step: int) -> list[str]:
        """A resume: the run's latest checkpoint is the one it resumes from, and its log ends there.
        Returns the names of later checkpoints, left by the branch that the resume abandons."""
        same_dir = checkpoint.parent.resolve() == self.path.resolve()
        record_latest(self.path, checkpoint if same_dir else None, next_seq(self.path) - 1)
        log = self.path / LOG
        kept = [r for r in read_log(log) if r.get("step", 0) <= step] if log.is_file() else []
        write_owned(self.path, LOG, b"".join(json.dumps(r).encode() + b"\n" for r in kept), grows=True)
        return sorted((p.name for p in self.path.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and int(m.group(1)) > step),
                      key=lambda n: int(n.split("-")[1]))

    def close(self) -> None:
        self._lock.close()


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a torn or foreign line (a killed writer) is skipped, not fatal."""
    records = []
    with path.open("rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
    return records


def _lock(run_dir: Path):
    """Hold an exclusive lock on the run directory, or say which process holds it."""
    path = run_dir / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")
    f.seek(0)
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise OrtloraError(f"{run_dir} is in use by another ortlora-train (process {owner}); "
                           "wait for it to finish, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
