"""The CLI in-process: bad input gives one clear line, exit code 2, and nothing written."""

import os
import subprocess
import sys

import pytest

from copra.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "sets, message",
    [
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["task=no_such_task"], "no_such_task"),
        (["shots=100000"], "shots=100000"),
        (["shots=100000"], "task 'bbc_news': class 'business' has only"),
        (["seed=-1"], "seed must be in [0, 2**32)"),
        (["checkpoint_every=-5"], "checkpoint_every must be >= 0"),
        (["max_length=33"], "max_length=33 exceeds the 32 positions"),
        (["preset=[1, 2]"], "unknown preset [1, 2]"),
        (["lr=1e999"], "lr must be a finite positive number"),
        (["steps=0"], "steps must be >= 1"),
        (["initial_p=1.5"], "initial_p must be a probability"),
        (["final_p=-0.1"], "final_p must be a probability"),
        (["method=dora"], "method must be one of"),
        (["lr=abc"], "lr must be a number"),
        (["target_modules=nothere"], "target module 'nothere'"),
        (["granularity=head"], "granularity must be one of"),
        (["noequals"], "--set takes key=value"),
    ],
)
def test_train_bad_input(capsys, tmp_path, tiny_text_model, sets, message):
    out = tmp_path / "out"
    argv = ["train", "--set", f"model={tiny_text_model}", "--set", f"output_dir={out}", "--set", "progress=false"]
    for item in sets:
        argv += ["--set", item]
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_bad_arguments_are_one_line(capsys, tmp_path):
    for argv, message in (
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["prune", "x", "--sparsity", "half", "-o", "y"], "invalid float value: 'half'"),
        (["merge", "a", "b"], "the following arguments are required: -o/--output"),
        (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    ):
        code, stdout, stderr = _run(capsys, *argv)
        assert code == 2 and message in stderr and stderr.count("\n") == 1 and not stdout, (argv, stderr)
    with pytest.raises(SystemExit) as exit_info:  # --help still prints the help and exits 0
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--resume" in capsys.readouterr().out


def test_bad_output_dir(capsys, tmp_path, tiny_text_model):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        code, _, stderr = _run(
            capsys,
            "train",
            "--set",
            f"model={tiny_text_model}",
            "--set",
            f"output_dir={out}",
            "--set",
            "progress=false",
            "--set",
            "shots=2",
            "--set",
            "max_length=16",
        )
        assert code == 2 and str(tmp_path / "file") in stderr and stderr.count("\n") == 1


def test_bad_config_files(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    code, _, err = _run(capsys, "train", "--config", str(bad))
    assert code == 2 and "not valid YAML" in err
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    code, _, err = _run(capsys, "train", "--config", str(listy))
    assert code == 2 and "mapping" in err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lr: 1e-3\nlearning_rate: 3\n")
    code, _, err = _run(capsys, "train", "--config", str(unknown))
    assert code == 2 and "'learning_rate'" in err


def test_train_from_yaml_with_override(capsys, tmp_path, tiny_text_model):
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(
        f"model: {tiny_text_model}\ntask: drug_reviews\nshots: 2\nsteps: 3\nbatch_size: 4\n"
        f"eval_examples: 12\nmax_length: 16\nlr: 5e-3\nprogress: false\noutput_dir: {out}\n"
    )
    code, stdout, _ = _run(capsys, "train", "--config", str(config), "--set", "method=lora")
    assert code == 0 and "lora on drug_reviews" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "result.json").exists()


def test_train_takes_output_flag_over_the_yaml_and_refuses_a_different_set(capsys, tmp_path, tiny_text_model):
    config, out, elsewhere = tmp_path / "run.yaml", tmp_path / "out", tmp_path / "elsewhere"
    config.write_text(
        f"model: {tiny_text_model}\nshots: 2\nsteps: 2\nbatch_size: 4\neval_examples: 12\n"
        f"max_length: 16\nprogress: false\noutput_dir: {elsewhere}\n"
    )
    for command in (["train", "--config", str(config)], ["sweep"]):  # two different folders: one line, nothing written
        code, stdout, err = _run(capsys, *command, "-o", str(out), "--set", f"output_dir={elsewhere}")
        assert code == 2 and "name different folders" in err and err.count("\n") == 1 and not stdout, err
    assert not out.exists() and not elsewhere.exists()
    code, stdout, _ = _run(capsys, "train", "--config", str(config), "-o", str(out), "--set", f"output_dir={out}/")
    assert code == 0 and stdout.rstrip().endswith(str(out / "adapter"))  # the same folder twice is fine
    assert (out / "result.json").exists() and not elsewhere.exists()  # -o wins over the YAML's output_dir
    config.write_text(config.read_text().replace("progress: false", "progress: true"))
    code, _, err = _run(capsys, "train", "--config", str(config), "-o", str(tmp_path / "quiet"), "-q")
    assert code == 0 and "it/s" not in err and (tmp_path / "quiet" / "result.json").exists()  # -q: no progress bar
    code, _, err = _run(capsys, "train", "--config", str(config), "-o", str(tmp_path / "loud"))
    assert code == 0 and "it/s" in err  # the bar -q removes


def test_demo_rejects_unknown_task_before_writing(capsys, tmp_path):
    out = tmp_path / "results"
    code, _, err = _run(capsys, "demo", "-o", str(out), "--tasks", "bbc_news,nope", "-q")
    assert code == 2 and "'nope'" in err and not out.exists()


def _copra_process(*argv, **options) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "copra", *argv], env=env, text=True, timeout=300, **options)


@pytest.mark.slow
def test_python_dash_m_copra_is_the_copra_command(capsys):
    listed = _copra_process("tasks", "bbc_news", "drug_reviews", capture_output=True)
    assert listed.returncode == 0 and listed.stdout == _run(capsys, "tasks", "bbc_news", "drug_reviews")[1]
    refused = _copra_process("train", "--bogus", capture_output=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--bogus" in refused.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    """`copra tasks | head -2`, made deterministic: the reader has left before copra writes a byte."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = _copra_process("tasks", stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert finished.returncode == 141 and finished.stderr == ""  # 128 + SIGPIPE, no traceback


def test_train_help_lists_every_config_key_with_its_help(capsys):
    from dataclasses import fields

    from copra.core.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.split("config keys", 1)[1].splitlines()
    for f in fields(TrainConfig):
        row = next((line for line in lines if line.split(" = ")[0].strip() == f.name), None)
        assert row is not None, f.name
        assert len(row.split("  ")) > 1 and row.rstrip() != row.split(" = ")[0], f"{f.name} has no help"
    assert any(line.strip().startswith("rank = 2") and "LoRA rank r" in line for line in lines)


def test_every_experiment_takes_quiet(capsys, monkeypatch, tmp_path):
    """`-q` sets progress=false on any experiment, as on `copra train`; its keys show in --help."""
    from copra import experiments

    seen = {}
    real = experiments.EXPERIMENTS["sweep"]

    def fake_run(config):
        seen["progress"] = config.progress
        return {}

    monkeypatch.setitem(
        experiments.EXPERIMENTS, "sweep", lambda: real()._replace(run=fake_run, render=lambda s: "done")
    )
    assert main(["sweep", "-q", "-o", str(tmp_path / "out")]) == 0
    assert seen == {"progress": False}
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "curve_every = 0" in capsys.readouterr().out


def test_top_level_help_lists_every_command_once_by_group(capsys):
    assert main(["nosuch"]) == 2
    choices = capsys.readouterr().err.split("choose from", 1)[1]
    commands = {c.strip(" '\"()") for c in choices.split("(see")[0].split(",")}
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()[0] in commands]
    assert len(commands) >= 14 and sorted(listed) == sorted(commands)
    assert "adapters:" in out and "paper experiments" in out
