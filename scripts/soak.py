"""Crash-safety soak: kill -9 ortlora-train, ortlora-build and ortlora-export at random moments.

    python scripts/soak.py --trials 50 [--seed S] [--work DIR] [--kinds train,build,export] [--keep]

Setup: the tiny artifacts, an uninterrupted reference run (--steps, a checkpoint every 3, eval every 20)
and its exports. Trials, 60% train, 20% build, 20% export:
  train   the reference run killed at a uniform moment of its expected time, or (AIM) as a checkpoint is
          being written, just renamed in place, or the final one just renamed in (before the run's end is
          written); then resumed, killed again with chance REKILL, until done. Every checkpoint must load and
          none may vanish; at the end each must equal the reference's, log.jsonl and summary.json parse, and
          --resume of the finished run changes nothing.
  build   killed at random, into a fresh directory or (REPLACE) with --force over an earlier output, half
  export  of those as it is swapped out: nothing, a complete output or the earlier one must be left; the
          rerun must load (build) or equal the reference export byte for byte (export).
Prints a line per trial and a summary: kills (in checkpoint writes), resumes, reruns, incomplete and lost
outputs (must be 0), staging/temporary leftovers after the kills and after the resume or rerun, and the
largest difference from the uninterrupted run (must be 0.0). Exits 1 on a failure (2 if setup fails),
keeping the work directory (default: a new one in the temp dir, removed on success unless --keep).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ortlora.errors import OrtloraError
from ortlora.output_dirs import check_location
from ortlora.ownership import FILES_RECORD, unproven

BIN = Path(sys.executable).parent  # the environment's console scripts sit beside its interpreter
SHARE = {"train": 0.6, "build": 0.2, "export": 0.2}
AIM, REKILL, ONNX, REPLACE = 0.4, 0.3, 0.2, 1 / 3  # chances per kill, per resume, per export, per build/export
MAX_RUNS = 10  # processes per training trial: nine resumes all killed is 0.3 ** 9, once in 50,000 trials
TIMEOUT = 300  # seconds one command may take before the soak calls it hung
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json")
CHECKPOINT_TEMP = (".checkpoint-*.tmp-*", ".checkpoint-*.old-*")
TMPDIR_TEMP = ("ortlora-*", "tmp*")  # in TMPDIR: the tiny build's model directory, the onnx export's scratch


class TrialFailed(Exception):
    def __init__(self, text: str, tally: str = ""):
        super().__init__(text)
        self.tally = tally  # the summary's counter it adds to


def entries(directory: Path, *patterns: str) -> set[str]:
    try:
        return {n for n in os.listdir(directory) if any(fnmatch.fnmatch(n, p) for p in patterns)}
    except FileNotFoundError:
        return set()


def kill_at(proc: subprocess.Popen, delay: float, watch=None) -> bool:
    """SIGKILL proc after delay seconds (and once watch() holds); False if it exited by itself first."""
    start = time.monotonic()
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        if elapsed > TIMEOUT:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TrialFailed(f"still running after {TIMEOUT} s: {' '.join(proc.args)}")
        if elapsed >= delay and (watch is None or watch()):
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: any children go too
            return proc.wait(timeout=60) == -signal.SIGKILL
        time.sleep(0.005 if elapsed < delay else 0)  # once aiming, poll as fast as the loop goes
    return False


def appears(directory: Path, pattern: str):
    """A watch for kill_at: true once an entry matching pattern appears that was not there at its first call."""
    seen = None

    def watch() -> bool:
        nonlocal seen
        now = entries(directory, pattern)
        seen = now if seen is None else seen
        return bool(now - seen)
    return watch


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        raise TrialFailed(f"{a} holds other tensors than {b}")
    return max((float(np.max(np.abs(x[k].astype(np.float64) - y[k]))) for k in x if x[k].size), default=0.0)


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Every checkpoint-STEP of run_dir, each checked complete: its safetensors load and its JSON parses."""
    found, bad = {}, []
    for m in filter(None, map(CHECKPOINT_RE.match, entries(run_dir, "checkpoint-*"))):
        path = run_dir / m.group(0)
        try:
            for f in CHECKPOINT_FILES:
                load_file(str(path / f)) if f.endswith(".safetensors") else json.loads((path / f).read_text())
            found[int(m.group(1))] = path
        except Exception as e:  # noqa: BLE001 -- any way of failing to load is a half-written checkpoint
            bad.append(f"{path.name} ({type(e).__name__}: {e})")
    if bad:
        raise TrialFailed("incomplete checkpoint: " + "; ".join(bad), "incomplete")
    return found


def export_diff(out: Path, ref: Path) -> tuple[float, bool]:
    """An export's largest tensor difference from the reference export, and whether all files are byte-equal."""
    names, ref_names = sorted(os.listdir(out)), sorted(os.listdir(ref))
    if names != ref_names:
        raise TrialFailed(f"incomplete export: {out} holds {names}, the reference {ref_names}")
    if strangers := unproven(out, "ortlora-export"):  # ortlora-files.json must prove every file, or a later --force refuses it
        raise TrialFailed(f"{out}: ortlora-files.json does not prove {strangers}", "incomplete")
    different = [n for n in names if (out / n).read_bytes() != (ref / n).read_bytes()]
    if [n for n in different if not n.endswith(".safetensors") and n != FILES_RECORD]:  # the record: their hashes
        raise TrialFailed(f"{out}: {different} differ from the reference export's")
    return (max((max_diff(out / n, ref / n) for n in different if n != FILES_RECORD), default=0.0),
            not different)


def build_diff(out: Path, ref: Path) -> tuple[float, bool]:
    try:
        __import__("ortlora.manifest").manifest.Manifest.load(out)  # ortlora.json parses, the files it names exist
    except Exception as e:  # noqa: BLE001
        raise TrialFailed(f"incomplete build: {e}", "incomplete") from None
    return 0.0, True


class Soak:
    """The work directory, the reference outputs, and the tallies every trial adds to."""

    def __init__(self, work: Path, rng: random.Random, steps: int):
        self.work, self.rng, self.steps, self.tmp, self.logs = work, rng, steps, work / "tmp", work / "logs"
        for d in (self.tmp, self.logs):
            d.mkdir(parents=True)
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}  # the commands' temporary files land where they are counted
        self.count, self.diff, self.failures, self.seconds = collections.Counter(), 0.0, [], {}
        self.artifacts, self.ref, self.proc = work / "artifacts", work / "ref", None

    def cli(self, name: str, *args) -> list[str]:
        return [str(BIN / name), *map(str, args)]

    def train_cmd(self, out: Path, *extra) -> list[str]:
        return self.cli("ortlora-train", "--artifacts", self.artifacts, "--out", out, "--max-steps", self.steps,
                        "--save-every", 3, "--eval-every", 20, "--no-progress", "--no-plot", "--seed", 0, *extra)

    def export_cmd(self, to: str, out: Path) -> list[str]:
        return self.cli("ortlora-export", "--artifacts", self.artifacts, "--adapter", self.ref, "--to", to, "--out", out,
                        "--force")

    def launch(self, cmd: list[str], log: str) -> subprocess.Popen:
        with open(self.logs / f"{log}.log", "a") as f:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.proc.log, self.proc.started = self.logs / f"{log}.log", time.monotonic()
        return self.proc

    def finished_first(self, proc: subprocess.Popen, key: str) -> None:
        """A whole run that beat its kill: its time, if shorter, is the expected time (the machine was busy)."""
        self.finish(proc)
        self.count["finished before the kill"] += 1
        if key:
            self.seconds[key] = min(self.seconds[key], time.monotonic() - proc.started)

    def finish(self, proc: subprocess.Popen) -> float:
        start = time.monotonic()
        if not kill_at(proc, TIMEOUT + 1) and proc.returncode != 0:
            last = [line for line in proc.log.read_text().splitlines() if line.strip()][-1:]
            raise TrialFailed(f"exit {proc.returncode} of {' '.join(proc.args)}: {' '.join(last)}")
        return time.monotonic() - start

    def run(self, cmd: list[str], log: str) -> float:
        return self.finish(self.launch(cmd, log))

    def setup(self, targets: set[str]) -> None:
        build = self.cli("ortlora-build", "--tiny", "--out", self.artifacts, "--force")
        self.seconds["build"] = self.run(build, "setup")
        self.seconds["train"] = self.run(self.train_cmd(self.ref), "setup")
        for to in sorted(targets):
            self.seconds[to] = self.run(self.export_cmd(to, self.work / f"ref-{to}"), "setup")
        for name in os.listdir(self.tmp):
            shutil.rmtree(self.tmp / name, ignore_errors=True)


def train_trial(s: Soak, i: int, _to: str) -> str:
    run_dir, log, before = s.work / f"train-{i}", f"train-{i}", s.count.copy()
    resume_cmd = s.cli("ortlora-train", "--resume", run_dir, "--no-progress", "--no-plot")
    cmd = s.train_cmd(run_dir)
    for attempt in range(MAX_RUNS):
        saved, temp_before = checkpoints(run_dir), entries(run_dir, *CHECKPOINT_TEMP)
        proc = s.launch(cmd, log)
        if attempt == 0 or s.rng.random() < REKILL:
            # AIM: from a random moment on, kill as the next checkpoint's temporary directory, the checkpoint
            # itself, or the final checkpoint appears: while it is written, or just after it is renamed in place
            aim = s.rng.random() < AIM and s.rng.choice([CHECKPOINT_TEMP[0], "checkpoint-*", f"checkpoint-{s.steps}"])
            s.count[f"kills aimed at {aim}"] += bool(aim)
            if kill_at(proc, s.rng.uniform(0, s.seconds["train"]), appears(run_dir, aim) if aim else None):
                new = entries(run_dir, *CHECKPOINT_TEMP) - temp_before
                s.count.update({"kills": 1, "kills in checkpoint writes": int(bool(new)),
                                "leftovers after kills": len(new)})
                if lost := sorted(set(saved) - set(checkpoints(run_dir))):
                    raise TrialFailed(f"checkpoints {lost} vanished when the run was killed", "lost")
                s.count["kills after the last step was saved"] += (s.steps in checkpoints(run_dir)
                                                                   and not (run_dir / "summary.json").exists())
                resume = bool(checkpoints(run_dir))
                s.count["resumes" if resume else "train reruns"] += 1
                cmd = resume_cmd if resume else s.train_cmd(run_dir, "--overwrite")
                continue
            s.finished_first(proc, "train" if attempt == 0 else "")  # a resume's time is not a whole run's
            break
        s.finish(proc)
        break
    else:
        raise TrialFailed(f"{run_dir} not finished after {MAX_RUNS} runs")
    s.count["leftovers after finish"] += (left := len(entries(run_dir, *CHECKPOINT_TEMP)))
    diff, c = check_finished_run(s, run_dir, resume_cmd, log), s.count - before
    return (f"kills {c['kills']} ({c['kills in checkpoint writes']} in a checkpoint write), max diff {diff}, "
            f"leftovers {c['leftovers after kills']} -> {left}")


def check_finished_run(s: Soak, run_dir: Path, resume_cmd: list[str], log: str) -> float:
    found, ref = checkpoints(run_dir), checkpoints(s.ref)
    if s.steps not in found or set(found) - set(ref):
        raise TrialFailed(f"{run_dir} has checkpoints {sorted(found)}, the reference {sorted(ref)}")
    files = [f for f in CHECKPOINT_FILES if f.endswith(".safetensors")]
    s.diff = max(s.diff, diff := max(max_diff(found[k] / f, ref[k] / f) for k in found for f in files))
    try:  # every line, the last one too: a kill must not leave half a record
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    except json.JSONDecodeError as e:
        raise TrialFailed(f"{run_dir}/log.jsonl: {e}", "incomplete") from None
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    s.count["steps logged twice"] += len(steps) - len(set(steps))
    if json.loads((run_dir / "summary.json").read_text()).get("steps") != s.steps:
        raise TrialFailed(f"{run_dir}/summary.json does not report {s.steps} steps")
    final, ended = (found[s.steps] / files[0]).read_bytes(), (run_dir / "summary.json").read_bytes()
    s.run(resume_cmd, log)  # a finished run: nothing to do
    s.count["finished-run resumes that rewrote it"] += ((found[s.steps] / files[0]).read_bytes() != final
                                                        or (run_dir / "summary.json").read_bytes() != ended)
    return diff


def after_kill(out: Path, ref: Path, check, replace: bool) -> str:
    """What a kill left: a complete output, none, or (killed between the renames of a replace) the old one aside."""
    if entries(out, "*"):
        try:
            check(out, ref)
        except TrialFailed as e:
            raise TrialFailed(f"after the kill: {e}", "incomplete") from None
        return "complete"
    if not replace:
        return "absent"
    for aside in entries(out.parent, f".{out.name}.old-*"):
        if entries(out.parent / aside / out.name, "*"):
            check(out.parent / aside / out.name, ref)
            return "old one aside"
    raise TrialFailed(f"the earlier {out} is gone, and no copy aside, after --force was killed", "lost")


def output_trial(s: Soak, i: int, to: str) -> str:
    """A build (to == "build") or an export killed at random, checked, then rerun to completion."""
    kind = "build" if to == "build" else "export"
    out, log = s.work / f"{kind}-{i}", f"{kind}-{i}"
    ref, check = (s.artifacts, build_diff) if kind == "build" else (s.work / f"ref-{to}", export_diff)
    cmd = s.cli("ortlora-build", "--tiny", "--out", out, "--force") if kind == "build" else s.export_cmd(to, out)

    def leftovers() -> int:
        return len(entries(s.work, f".{out.name}.partial-*", f".{out.name}.old-*") | entries(s.tmp, *TMPDIR_TEMP))

    replace, watch = s.rng.random() < REPLACE, None
    if replace:  # a complete earlier output that --force replaces: a kill must leave it or the new one
        shutil.copytree(ref, out)
        if s.rng.random() < 0.5:  # aim at the swap: kill as the directory the old one goes aside into appears
            watch = appears(s.work, f".{out.name}.old-*")
        s.count["replacing" if watch is None else "replacing, aimed"] += 1
    proc = s.launch(cmd, log)
    if not (killed := kill_at(proc, 0 if watch else s.rng.uniform(0, s.seconds[to]), watch)):
        s.finished_first(proc, to)
    s.count["kills"] += killed
    s.count[f"left {(state := after_kill(out, ref, check, replace))}"] += killed
    s.count["leftovers after kills"] += (after := leftovers())
    s.run(cmd, log)
    s.count[f"{kind} reruns"] += 1
    diff, same = check(out, ref)
    s.diff = max(s.diff, diff)
    s.count["exports equal byte for byte"] += same and kind == "export"
    s.count["leftovers after finish"] += (left := leftovers())
    for name in entries(s.tmp, *TMPDIR_TEMP):  # counted: the next trial starts from an empty TMPDIR
        shutil.rmtree(s.tmp / name, ignore_errors=True)
    what = (f"{to}, " if kind == "export" else "") + ("replacing, " if replace else "") + ("aimed, " if watch else "")
    return f"{what}{'killed' if killed else 'finished first'} ({state}), leftovers {after} -> {left}"


def make_plan(trials: int, kinds: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """(kind, target) per trial, kinds in proportion to SHARE, in random order; target: build, --to, or ''."""
    share = sum(SHARE[k] for k in kinds)
    counts = {k: max(1, round(trials * SHARE[k] / share)) if trials >= len(kinds) else 0 for k in kinds}
    counts[kinds[0]] += trials - sum(counts.values())
    plan = [k for k in kinds for _ in range(counts[k])]
    rng.shuffle(plan)
    export = lambda: "onnx" if rng.random() < ONNX else rng.choice(["peft", "merged"])  # noqa: E731
    return [(k, export() if k == "export" else {"train": "", "build": "build"}[k]) for k in plan]


def summary(s: Soak, plan: list[tuple[str, str]], seconds: float, seed: int) -> None:
    c, kinds = s.count, collections.Counter(k for k, _ in plan)
    exports = ", ".join(f"{t} {n}" for t, n in sorted(collections.Counter(t for k, t in plan if k == "export").items()))
    print(f"\nsummary: {len(plan)} trials in {seconds:.0f} s, seed {seed}, {s.steps} steps a run (uninterrupted: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in s.seconds.items()) + ")")
    rows = {
        "trials": ", ".join(f"{k} {n}" for k, n in kinds.items()) + (f" (export: {exports})" if exports else ""),
        "kills": f"{c['kills']}, {c['kills in checkpoint writes']} during a checkpoint write (aimed at one being "
                 f"written {c['kills aimed at .checkpoint-*.tmp-*']}, just renamed {c['kills aimed at checkpoint-*']}, "
                 f"the final one just renamed {c[f'kills aimed at checkpoint-{s.steps}']}); "
                 f"{c['kills after the last step was saved']} left the last step saved and the run's end unwritten; "
                 f"{c['finished before the kill']} processes finished before their kill",
        "build/export kills left": f"{c['left complete']} complete, {c['left absent']} nothing, "
                                   f"{c['left old one aside']} the old one aside "
                                   f"({c['replacing']} + {c['replacing, aimed']} aimed --force replaces)",
        "resumes": c["resumes"],
        "reruns": f"train from scratch {c['train reruns']}, build {c['build reruns']}, export {c['export reruns']}",
        "incomplete outputs": f"{c['incomplete']} (half-written checkpoints, builds, exports, log lines; must be 0)",
        "lost outputs": f"{c['lost']} (saved checkpoints, or an output a killed --force replace lost; must be 0)",
        "leftovers after kills": f"{c['leftovers after kills']} (.checkpoint-*.tmp-*, .NAME.partial-*, .old-*, TMPDIR)",
        "leftovers after finish": f"{c['leftovers after finish']} still there once the resume or rerun finished",
        "max diff vs reference": f"{s.diff} (each checkpoint's adapter and optimizer state, exports; must be 0.0)",
        "exports byte-equal": f"{c['exports equal byte for byte']} of {kinds['export']}",
        "anomalies": f"{c['steps logged twice']} train steps logged twice in log.jsonl; "
                     f"{c['finished-run resumes that rewrote it']} finished-run resumes rewrote the last checkpoint or "
                     "summary.json",
        "failures": len(s.failures),
    }
    for name, text in rows.items():
        print(f"  {name:<26}{text}")
    for failure in s.failures:
        print("  FAILED " + failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan and the kill moments")
    parser.add_argument("--work", type=Path, help="work directory, new or empty (default: a new one in the temp dir)")
    parser.add_argument("--kinds", default="train,build,export", help="comma-separated: train, build, export")
    parser.add_argument("--steps", type=int, default=300, help="steps of a training run (300: about 3 s on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if set(kinds := args.kinds.split(",")) - set(SHARE):
        parser.error(f"--kinds takes {', '.join(SHARE)}, got {args.kinds}")
    if args.work and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty")
    if args.work:  # it is removed on success: never the current directory, one above it, home or a root
        try:
            check_location(args.work)
        except OrtloraError as e:
            parser.error(str(e).replace("--out", "--work"))
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="ortlora-soak-"))
    rng = random.Random(args.seed)
    plan = make_plan(args.trials, kinds, rng)
    s, start = Soak(work, rng, args.steps), time.monotonic()
    print(f"soak: {len(plan)} trials in {work}; setup: build, reference run, reference exports", flush=True)
    try:
        s.setup({t for k, t in plan if k == "export"})
        for i, (kind, to) in enumerate(plan, 1):
            try:
                note = (train_trial if kind == "train" else output_trial)(s, i, to)
            except Exception as e:  # noqa: BLE001 (a missing or unreadable file is a finding too, not the soak's end)
                s.count[getattr(e, "tally", "")] += bool(getattr(e, "tally", ""))
                text = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"
                s.failures.append(f"trial {i} ({to or kind}, --seed {args.seed}, log {s.logs / kind}-{i}.log): {text}")
                note = f"FAILED: {text}"
            print(f"[{i:>{len(str(len(plan)))}}/{len(plan)}] {kind:<6} {note}", flush=True)
    except TrialFailed as e:
        print(f"setup failed: {e}\nwork directory kept: {work}")
        return 2
    finally:
        if s.proc and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
    summary(s, plan, time.monotonic() - start, args.seed)
    ok = not s.failures and s.diff == 0.0
    if ok and not args.keep:
        shutil.rmtree(work)
    else:
        print(f"work directory kept: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
