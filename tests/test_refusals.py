"""Settings that would be ignored are refused, and absurd values are refused before any heavy work: each ends in
one ``error:`` line (exit 2) that names the option, its value and what to pass instead (issue 25, section 2)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from ortlora.build import cli as build_cli
from ortlora.errors import OrtloraError, cli_entry
from ortlora.handoff import cli as export_cli
from ortlora.runtime import cli as train_cli
from ortlora.runtime import config as cfg
from ortlora.runtime import generate_cli
from tests.cli_helpers import one_line

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]
CPUS = os.cpu_count() or 1


def train(*argv: str) -> int:
    return train_cli.main([*FAST, *argv])


# -- ortlora-train: settings that would be ignored -------------------------------------------------------

def test_resume_in_a_toml_file_resumes_as_the_option_does(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 0
    config = tmp_path / "conf" / "resume.toml"
    config.parent.mkdir()
    config.write_text('resume = "../run"\nmax_steps = 3\n')  # relative to the file, as every path in it
    capsys.readouterr()
    assert train("--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "resumed from " in out and "checkpoint-2 at step 2" in out
    assert (run / "checkpoint-3").is_dir()
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["position"]["step"] == 3


@pytest.mark.parametrize("extra, says", [
    (["--max-steps", "1", "--resume", "RUN", "--init-adapter", "RUN/checkpoint-1"],
     "--init-adapter RUN/checkpoint-1 would be ignored: pass one of them"),
    (["--resume", "RUN", "--overwrite", "--max-steps", "2"], "--overwrite would start RUN over, and --resume RUN"),
    (["--epochs", "2", "--max-steps", "3"], "--epochs and --max-steps both set the length of the run"),
    (["--max-steps", "3", "--warmup-steps", "4"], "--warmup-steps 4 is longer than the run (--max-steps 3)"),
    (["--max-steps", "1", "--min-lr", "1e-5", "--schedule", "constant"], "--schedule constant never decays"),
    (["--max-steps", "1", "--eval-split", "0.1", "--eval-data", "DATA"], "--eval-split 0.1 holds out training data"),
    (["--max-steps", "1", "--data", "DATA", "--eval-every", "1"], "--eval-every 1 needs evaluation data"),
    (["--max-steps", "1", "--data", "DATA", "--eval-batches", "2"], "--eval-batches 2 needs evaluation data"),
    (["--max-steps", "1", "--allow-fallback"], "--allow-fallback lets the CPU provider take over from another --ep"),
    (["--max-steps", "1", "--allow-fallback", "--ep", "cuda"], "uses ORT's training API, which has no fallback"),
])
def test_train_settings_that_would_be_ignored_are_refused(artifacts, tmp_path, capsys, extra, says):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1") == 0
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n' * 4)
    extra = [a.replace("RUN", str(run)).replace("DATA", str(data)) for a in extra]
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    err = one_line(capsys, train("--artifacts", str(artifacts), *extra))
    assert says.replace("RUN", str(run)) in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_toml_file_that_sets_a_setting_twice_or_both_lengths_is_refused(artifacts, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 2\nmax_steps = 3\n")
    assert f"{config}: epochs and max_steps both set" in one_line(capsys, train("--config", str(config)))
    config.write_text("max-steps = 2\nmax_steps = 3\n")
    assert "'max-steps' and 'max_steps' are the same setting" in one_line(capsys, train("--config", str(config)))


def test_epochs_on_the_command_line_win_over_max_steps_in_the_file(artifacts, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'artifacts = "{artifacts}"\nmax_steps = 100\n')
    args = train_cli.parse_args(["--config", str(config), "--epochs", "2"])
    c, _ = train_cli.resolve_config(args)
    assert (c.epochs, c.max_steps) == (2, None)


# -- ortlora-train: absurd numbers, paths that cannot be looked up -------------------------------------------

@pytest.mark.parametrize("option, value, says", [
    ("--threads", str(10**9), f"--threads 1000000000 is more than 4 threads for each of this machine's {CPUS} CPUs"),
    ("--seed", "-1", "--seed must be from 0 to 4294967295, got -1"),
    ("--seed", str(2**64), f"--seed must be from 0 to 4294967295, got {2**64}"),
    ("--grad-accum", "1000000", "--grad-accum must be from 1 to 1024"),
    ("--workers", "1000", f"--workers 1000 needs 1000 CPUs (one per worker), and this machine has {CPUS}"),
])
def test_absurd_train_numbers_are_refused_before_any_work(artifacts, tmp_path, capsys, option, value, says):
    err = one_line(capsys, train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), option, value))
    assert says in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--data", "--eval-data", "--init-adapter", "--resume", "--artifacts", "--config"])
def test_a_symbolic_link_to_itself_is_one_line(artifacts, tmp_path, capsys, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {"--artifacts": [option, str(loop)]}.get(option, ["--artifacts", str(artifacts), option, str(loop)])
    err = one_line(capsys, train("--out", str(tmp_path / "run"), "--max-steps", "1", *argv))
    assert f"{option} {loop}: Too many levels of symbolic links (a symbolic link that leads back to itself)" in err


def test_the_cluster_check_counts_cpus():
    cfg.check_workers(4, 4.0, "the Ray cluster")
    with pytest.raises(OrtloraError, match=r"--workers 5 needs 5 CPUs \(one per worker\), and the Ray cluster at "
                                           r"auto has 4; pass --workers 4 or fewer"):
        cfg.check_workers(5, 4.0, "the Ray cluster at auto")


# -- ortlora-build ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, says", [
    (["--rank", "100000000"], "--rank 100000000 is more than the model's hidden size 64"),
    (["--rank-pattern", "v_proj=100000000"], "--rank-pattern v_proj=100000000 is more than the model's hidden size 64"),
    (["--layers", "0-2000000000"], "--layers 0-2000000000: layer 2 is out of range; the model has 2 layers (0 to 1)"),
    (["--layers", "1,5-2000000000"], "--layers 1,5-2000000000: layer 5 is out of range; the model has 2 layers"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    (["--seed", str(2**64)], f"--seed must be from 0 to 4294967295, got {2**64}"),
    (["--threads", str(10**9)], "--threads 1000000000 is more than 4 threads for each of this machine's"),
    (["--alpha", "1e300"], "--alpha 1e+300 is beyond float32's range"),
    (["--alpha-pattern", "q_proj=1e300"], "--alpha-pattern q_proj=1e+300 is beyond float32's range"),
    (["--block-size", "0"], "--block-size 0 is for an int8 / int4 base, and --base-precision is fp32"),
    (["--block-size", "32", "--base-precision", "fp32"], "--block-size 32 is for an int8 / int4 base"),
    (["--rank-pattern", " "], "--rank-pattern ' ' names no module: pass NAME=VALUE pairs, or leave it out"),
    (["--alpha-pattern", "{}"], "--alpha-pattern '{}' names no module"),
])
def test_build_options_that_cannot_apply_are_refused_before_torch_works(tmp_path, capsys, extra, says):
    out = tmp_path / "artifacts"
    assert says in one_line(capsys, build_cli.main(["--tiny", "--out", str(out), *extra]))
    assert not out.exists()


def test_build_ranks_and_ranges_are_checked_against_the_models_own_config(tiny_model, tmp_path, capsys):
    out = tmp_path / "artifacts"
    err = one_line(capsys, build_cli.main(["--model", str(tiny_model), "--out", str(out), "--layers", "0,1-2"]))
    assert "--layers 0,1-2: layer 2 is out of range; the model has 2 layers (0 to 1)" in err
    err = one_line(capsys, build_cli.main(["--model", str(tiny_model), "--out", str(out), "--rank", "65"]))
    assert "--rank 65 is more than the model's hidden size 64" in err


@pytest.mark.parametrize("option", ["--model", "--out"])
def test_build_paths_that_loop_are_one_line(tiny_model, tmp_path, capsys, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {"--model": str(tiny_model), "--out": str(tmp_path / "artifacts")} | {option: str(loop)}
    err = one_line(capsys, build_cli.main([a for k, v in argv.items() for a in (k, v)]))
    assert f"{option} {loop}: Too many levels of symbolic links" in err


ROPE = {
    "an unknown type": ({"type": "bogus", "factor": 2.0}, "rope_scaling has rope type 'bogus', which transformers "
                        "does not compute; the types are default, linear, dynamic, yarn, longrope, llama3"),
    "a type that is not text": ({"rope_type": ["linear"]}, "rope_scaling has rope type ['linear']"),
    "not an object": ("linear", "rope_scaling must be an object (or null), not a string"),
    "no factor": ({"rope_type": "linear"}, "rope_scaling (rope type 'linear') is not one transformers can compute: "
                  "factor is missing"),
    "a factor as text": ({"rope_type": "yarn", "factor": "x"}, "factor is a string, not a positive number"),
    "a factor below 1": ({"rope_type": "dynamic", "factor": 0.5}, "factor is 0.5, below 1"),
    "llama3 without its factors": ({"rope_type": "llama3", "factor": 8.0},
                                   "low_freq_factor is missing; high_freq_factor is missing"),
}


@pytest.mark.parametrize("case", sorted(ROPE))
def test_rotary_scaling_transformers_cannot_compute_is_refused(tiny_model, tmp_path, capsys, case):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    rope, says = ROPE[case]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"rope_scaling": rope}))
    err = one_line(capsys, build_cli.main(["--model", str(model), "--out", str(tmp_path / "out")]))
    assert f"{model / 'config.json'}: " in err and says in err


def test_rope_theta_must_be_a_positive_number(tiny_model, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"rope_theta": "1e6"}))
    err = one_line(capsys, build_cli.main(["--model", str(model), "--out", str(tmp_path / "out")]))
    assert "rope_theta must be a positive number, not a string" in err


# -- ortlora-generate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, says", [
    (["--stop", ""], '--stop "" would stop before the first token: pass a non-empty string'),
    (["--stop", "x", "--stop="], '--stop "" would stop before the first token'),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    (["--temperature", "0.7", "--seed", str(2**64)], f"--seed must be from 0 to 4294967295, got {2**64}"),
    (["--threads", str(10**9)], "--threads 1000000000 is more than 4 threads for each of this machine's"),
    (["--top-k", "5"], "--top-k 5 sets how tokens are sampled, and --temperature 0 (the default) takes the likeliest"),
    (["--top-p", "0.9"], "--top-p 0.9 sets how tokens are sampled"),
    (["--temperature", "0", "--seed", "1"], "--seed 1 sets how tokens are sampled"),
    (["--batch-size", "4"], "--batch-size 4 is how many prompts of --prompts-file are generated at once"),
])
def test_generate_options_that_cannot_apply_are_refused(artifacts, capsys, extra, says):
    err = one_line(capsys, generate_cli.main(["--artifacts", str(artifacts), "--prompt", "hi", *extra]))
    assert says in err


def test_generate_sampling_options_are_taken_when_sampling(artifacts, capsys):
    argv = ["--artifacts", str(artifacts), "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0.8"]
    assert generate_cli.main([*argv, "--top-k", "5", "--top-p", "0.9", "--seed", "1"]) == 0


@pytest.mark.parametrize("option", ["--artifacts", "--adapter", "--prompts-file"])
def test_generate_paths_that_loop_are_one_line(artifacts, tmp_path, capsys, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    prompt = ["--prompts-file", str(loop)] if option == "--prompts-file" else ["--prompt", "hi"]
    argv = {"--artifacts": str(artifacts)} | ({option: str(loop)} if option != "--prompts-file" else {})
    err = one_line(capsys, generate_cli.main([a for k, v in argv.items() for a in (k, v)] + prompt))
    assert f"{option} {loop}: Too many levels of symbolic links" in err


# -- ortlora-export --------------------------------------------------------------------------------------------

def export(artifacts: Path, adapter: Path, out: Path, *extra: str) -> int:
    return export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--out", str(out), *extra])


@pytest.mark.parametrize("extra, says", [
    (["--to", "peft", "--gguf-type", "f16"], "--gguf-type f16 goes with --to gguf or gguf-merged; --to peft does not "
                                             "use it: leave --gguf-type out"),
    (["--to", "merged", "--gguf-type", "f32"], "--gguf-type f32 goes with --to gguf or gguf-merged; --to merged"),
    (["--to", "peft", "--with-base"], "--with-base goes with --to gguf; --to peft does not use it"),
    (["--to", "merged", "--with-base"], "--with-base goes with --to gguf; --to merged does not use it"),
    (["--to", "gguf-merged", "--with-base"], "--with-base goes with --to gguf; --to gguf-merged does not use it"),
    (["--to", "peft", "--ort-format"], "--ort-format goes with --to onnx; --to peft does not use it"),
    (["--to", "merged", "--ort-format"], "--ort-format goes with --to onnx; --to merged does not use it"),
    (["--to", "peft", "--max-shard-size", "1GB"], "--max-shard-size 1GB goes with --to merged; --to peft does not"),
    (["--to", "onnx", "--max-shard-size", "1GB"], "--max-shard-size 1GB goes with --to merged; --to onnx does not"),
    (["--to", "onnx-adapter", "--base", "BASE"], "--base BASE goes with --to peft or merged or onnx or gguf or "
                                                 "gguf-merged or mlx; --to onnx-adapter does not use it"),
    (["--to", "genai", "--base", "BASE"], "--to genai does not use it: leave --base out"),
    (["--to", "gguf", "--base", "BASE"], "--base BASE is read by --to gguf only with --with-base"),
    (["--to", "merged", "--max-shard-size", "0"], "--max-shard-size 0 is 0 bytes; a shard holds at least 1024 bytes"),
    (["--to", "merged", "--max-shard-size", "0.5KB"], "--max-shard-size 0.5KB is 512 bytes; a shard holds at least"),
    (["--to", "mlx", "--with-base"], "--with-base and --gguf-type go with --to gguf"),
    (["--to", "gguf", "--gguf-type", ""], "--gguf-type is empty: give it a value, or leave it out for the default"),
])
def test_export_options_the_target_would_ignore_are_refused(artifacts, trained_adapter, tmp_path, capsys, extra, says):
    base = str(artifacts / "base_model")
    out = tmp_path / "out"
    err = one_line(capsys, export(artifacts, trained_adapter, out, *[base if a == "BASE" else a for a in extra]))
    assert says.replace("BASE", base) in err
    assert not out.exists()


def test_export_options_the_target_uses_are_taken(artifacts, trained_adapter, tmp_path):
    assert export(artifacts, trained_adapter, tmp_path / "m", "--to", "merged", "--max-shard-size", "1KB") == 0
    assert export(artifacts, trained_adapter, tmp_path / "p", "--to", "peft", "--base", str(artifacts / "base_model")) == 0


@pytest.mark.parametrize("option", ["--artifacts", "--adapter", "--base", "--out"])
def test_export_paths_that_loop_are_one_line(artifacts, trained_adapter, tmp_path, capsys, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {"--artifacts": str(artifacts), "--adapter": str(trained_adapter), "--out": str(tmp_path / "out"),
            "--to": "merged"} | {option: str(loop)}
    err = one_line(capsys, export_cli.main([a for k, v in argv.items() for a in (k, v)]))
    assert f"{option} {loop}: Too many levels of symbolic links" in err


@pytest.mark.parametrize("value, shown", [(None, "missing"), ("2", "'2'"), (0, "0"), (True, "True")])
def test_mlx_export_needs_the_models_layer_count(artifacts, trained_adapter, tmp_path, capsys, value, shown):
    copy = Path(shutil.copytree(artifacts, tmp_path / "artifacts"))
    config = json.loads((copy / "config.json").read_text())
    config.pop("num_hidden_layers") if value is None else config.update(num_hidden_layers=value)
    (copy / "config.json").write_text(json.dumps(config))
    err = one_line(capsys, export(copy, trained_adapter, tmp_path / "out", "--to", "mlx"))
    assert f"{copy / 'config.json'}: num_hidden_layers is {shown}, not a positive integer; rebuild the artifacts" in err


def test_ray_workers_are_checked_against_the_clusters_cpus_and_gpus():
    from ortlora.runtime.distributed import check_resources

    check_resources(cfg.TrainConfig(workers=4), {"CPU": 4.0}, None)
    check_resources(cfg.TrainConfig(workers=2, ep="cuda"), {"CPU": 8.0, "GPU": 2.0}, "auto")
    with pytest.raises(OrtloraError, match=r"^--workers 1000 needs 1000 CPUs \(one per worker\), and the Ray cluster "
                                           r"at ray://head:10001 has 16; pass --workers 16 or fewer"):
        check_resources(cfg.TrainConfig(workers=1000), {"CPU": 16.0}, "ray://head:10001")
    with pytest.raises(OrtloraError, match=r"needs 3 GPUs \(one per worker\), and this machine's Ray cluster has 2; "
                                           r"pass --workers 2 or fewer"):
        check_resources(cfg.TrainConfig(workers=3, ep="cuda"), {"CPU": 8.0, "GPU": 2.0}, None)
    with pytest.raises(OrtloraError, match=r"has 0; train with --ep cpu"):
        check_resources(cfg.TrainConfig(workers=1, ep="cuda"), {"CPU": 8.0}, None)


# -- a full disk -----------------------------------------------------------------------------------------------

def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() reports it: no file name


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(artifacts, tmp_path, capsys, monkeypatch):
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", _full)
    run = tmp_path / "run"
    err = one_line(capsys, train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1"))
    assert err.startswith(f"error: no space left on the device while writing {run}: free some space there")
    assert "ortlora-train --resume continues from the last checkpoint" in err
    assert not list(run.glob("*checkpoint-1*"))  # the half-written checkpoint is gone


def test_a_full_disk_during_an_export_names_the_file(artifacts, trained_adapter, tmp_path, capsys, monkeypatch):
    def full(source, destination, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(export_cli.shutil, "copy2", full)
    out = tmp_path / "out"
    err = one_line(capsys, export(artifacts, trained_adapter, out, "--to", "peft"))
    assert err.startswith("error: no space left on the device while writing ") and "adapter_model.safetensors" in err
    assert not out.exists()


@pytest.mark.parametrize("error, says", [
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/file"), "the disk quota is exceeded while writing /q/file"),
    (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write failed: No space left on device"), "no space left on the device"),
    (ValueError("Error while serializing: IoError(Os { code: 122, message: \"Disk quota exceeded\" })"),
     "the disk quota is exceeded"),
])
def test_every_form_of_a_full_disk_is_one_line(capsys, error, says):
    @cli_entry
    def main(argv):
        try:
            raise error
        except Exception as e:
            raise RuntimeError("saving failed") from e  # found through the cause too

    err = one_line(capsys, main([]))
    assert err.startswith(f"error: {says}")


def test_other_os_errors_stay_unexpected(capsys):
    @cli_entry
    def main(argv):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    assert main([]) == 1
    assert "error: unexpected OSError" in capsys.readouterr().err


def test_a_path_that_cannot_be_looked_up_is_one_line(artifacts, tmp_path, capsys):
    name = tmp_path / ("x" * 5000)
    err = one_line(capsys, train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), "--data", str(name)))
    assert f"--data {name}: File name too long; pass another path" in err
    file = tmp_path / "file"
    file.write_text("")
    err = one_line(capsys, train("--artifacts", str(artifacts), "--out", str(file / "run")))
    assert f"--out {file / 'run'}: Not a directory; pass another path" in err


@pytest.fixture
def one_step_run(artifacts, tmp_path) -> Path:
    """A finished run of one step, to resume with a --config file beside it."""
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1") == 0
    return run


def test_resume_on_the_command_line_wins_over_the_files_init_adapter(artifacts, one_step_run, tmp_path, capsys):
    run = one_step_run
    config = tmp_path / "c.toml"
    config.write_text(f'artifacts = "{artifacts}"\ninit_adapter = "{run / "checkpoint-1"}"\n')
    c, resume_from = train_cli.resolve_config(train_cli.parse_args(["--config", str(config), "--resume", str(run)]))
    assert (c.init_adapter, resume_from) == (None, run / "checkpoint-1")
    config.write_text(f'resume = "{run}"\n')  # the other way round: both are the user's word for this run
    err = one_line(capsys, train("--config", str(config), "--init-adapter", str(run / "checkpoint-1")))
    assert "would be ignored: pass one of them" in err


@pytest.mark.parametrize("error", [
    MemoryError("std::bad_alloc"),
    RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 9"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
])
def test_memory_running_out_is_one_line(capsys, error):
    @cli_entry
    def main(argv):
        raise error

    err = one_line(capsys, main([]))
    assert err.startswith("error: out of memory (") and "pass smaller settings (a smaller --batch-size" in err


def test_resume_on_the_command_line_wins_over_the_files_overwrite(one_step_run, tmp_path, capsys):
    run = one_step_run
    config = tmp_path / "c.toml"
    config.write_text(f'out = "{run}"\noverwrite = true\n')
    c, _ = train_cli.resolve_config(train_cli.parse_args(["--config", str(config), "--resume", str(run)]))
    assert not c.overwrite
    assert train("--config", str(config), "--resume", str(run), "--max-steps", "2") == 0
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()  # continued, not started over
    config.write_text(f'resume = "{run}"\noverwrite = true\n')
    assert "--overwrite would start" in one_line(capsys, train("--config", str(config), "--max-steps", "3"))
