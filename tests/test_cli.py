"""The command line on real data: train, evaluate, resume after SIGKILL; user errors exit 2."""

import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cardkit.cli import main


def cardkit(*args, cwd=None, check=True):
    """`cardkit ARGS` in a process of its own, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "cardkit", *map(str, args)], capture_output=True,
                            text=True, cwd=cwd, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"cardkit {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def cardkit_here(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """`cardkit ARGS` run by `main` in this process: the command's own code and output without an
    interpreter and torch to start (4 s a call), for tests of what a command computes. The log
    settings `main` makes are undone afterwards."""
    logger = logging.getLogger("cardkit")
    saved = logger.handlers[:], logger.propagate, logger.level
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.chdir(cwd or Path.cwd()), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    result = subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"cardkit {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def mnist_config(tmp_path, shared_data, name="mnist", epochs=2):
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"""
name: {name}
output_dir: {tmp_path / 'runs'}
threat: {{norm: linf, eps: 0.1}}
data: {{name: mnist, data_dir: {shared_data}, download: false, train_size: 2000, val_size: 200,
        test_size: 300, batch_size: 100}}
model: {{name: cnn_small}}
pretrain:
  epochs: {epochs}
  objective: {{name: pgd_at, steps: 3}}
  optimizer: {{name: adam, lr: 0.002}}
  checkpoint_every: 4
evaluate: {{attacks: [{{name: pgd, steps: 10}}]}}
""")
    return config


@pytest.mark.slow
def test_cli_trains_evaluates_and_resumes_after_sigkill_on_mnist(tmp_path, shared_data):
    config = mnist_config(tmp_path, shared_data, epochs=3)
    out = cardkit("run", config, "--no-progress")
    assert "clean acc" in out.stdout and "cnn_small" in out.stdout
    run_dir = tmp_path / "runs" / "mnist"
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["robustness"]
    assert metrics["samples"] == 300 and metrics["clean_accuracy"] > 0.8
    assert metrics["robust_accuracy"] < metrics["clean_accuracy"]
    reference = load_file(next((run_dir / "pretrain" / "checkpoints").glob("epoch0003*")) / "model.safetensors")

    # The same run, killed with SIGKILL once its first mid-epoch checkpoint exists, then resumed.
    killed = mnist_config(tmp_path, shared_data, name="killed", epochs=3)
    process = subprocess.Popen([sys.executable, "-m", "cardkit", "run", str(killed), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "runs" / "killed" / "pretrain" / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while not pointer.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert pointer.exists()
    cardkit_here("run", killed, "--no-progress")
    resumed = load_file(next((tmp_path / "runs" / "killed" / "pretrain" / "checkpoints").glob("epoch0003*"))
                        / "model.safetensors")
    assert all((resumed[k] == reference[k]).all() for k in reference)

    again = cardkit_here("evaluate", "--checkpoint", run_dir, "--steps", "5", "--eps", "1/255")
    assert "linf eps 0.003922" in again.stdout
    table = cardkit_here("report", run_dir, "--markdown").stdout.splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert table[0].startswith("| run") and cells[:7] == ["mnist", "mnist", "cnn_small", "dense", "0.0000", "test", "300"]


@pytest.mark.parametrize("args,expected", [
    (["run", "nope.yaml"], "does not exist"),
    (["run", "{config}", "--set", "pretrain.epohcs=2"], "did you mean 'epochs'"),
    (["run", "{config}", "--set", "model.name=resnt18"], "did you mean 'resnet18'"),
    (["run", "{config}", "--set", "data.name=mnsit"], "mnist"),
    (["run", "{config}", "--set", "threat.eps=-1"], "threat.eps"),
    (["run", "{config}", "--set", "pretrain.objective.steps=0"], "pretrain.objective.steps"),
    (["run", "{config}", "--set", "data.data_dir={empty}"], "train-images-idx3-ubyte.gz"),
    (["run", "{notyaml}"], "not valid YAML"),
    (["evaluate", "--checkpoint", "{empty}"], "no checkpoint"),
    (["run", "{config}", "--set", "device=tpu"], "device"),
    (["prune", "--checkpoint", "{empty}", "--method", "hydra", "--sparsity", "0.9", "--bits", "9"],
     "bits must be an integer from 1 to 8"),
    (["prune", "--checkpoint", "{empty}", "--method", "atmc", "--sparsity", "0.9", "--bits", "0"],
     "bits must be an integer from 1 to 8"),
    (["run", "{config}", "--set", "prune.methods=[{{name: magnitude, sparsity: 0.9, quantize: {{bits: 12}}}}]"],
     "bits must be an integer from 1 to 8"),
    (["export", "--checkpoint", "{empty}", "--out", "{empty}/m.card"], "no checkpoint"),
    (["size", "--checkpoint", "{empty}"], "no checkpoint"),
] + ([] if torch.cuda.is_available() else [
    (["run", "{config}", "--set", "device=cuda"], "CUDA is not available"),
]))
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, args, expected):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\ndata: {{name: mnist, download: false}}\n"
                      f"pretrain: {{objective: {{name: pgd_at}}}}\n")
    notyaml = tmp_path / "bad.yaml"
    notyaml.write_text("a: [b\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(config=config, notyaml=notyaml, empty=empty) for a in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("cardkit: error: ") and captured.err.count("\n") == 1
    assert expected in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "run").exists(), "a failed start must not leave a run folder behind"


def test_truncated_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["train", "configs/quickstart.yaml" if Path("configs/quickstart.yaml").exists()
                 else str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
                 "--set", f"output_dir={tmp_path}", "--set", "pretrain.epochs=1", "--no-progress"]) == 0
    checkpoints = tmp_path / "quickstart" / "pretrain" / "checkpoints"
    weights = next(checkpoints.glob("epoch*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "quickstart")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_listing_commands(capsys):
    assert main(["models"]) == 0
    assert "cnn_small" in capsys.readouterr().out.split()
    assert main(["datasets"]) == 0
    assert {"digits", "mnist", "cifar10", "cifar100", "svhn"} <= set(capsys.readouterr().out.split())
    for command in ("run", "train", "evaluate", "datasets", "models"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quickstart_trains_on_cuda(tmp_path):
    out = cardkit("run", Path(__file__).parents[1] / "configs" / "quickstart.yaml", "--no-progress",
                  "--set", f"output_dir={tmp_path}", "--set", "device=cuda", "--set", "pretrain.epochs=3")
    metrics = json.loads((tmp_path / "quickstart" / "evaluate" / "metrics.json").read_text())
    assert metrics["robustness"]["robust_accuracy"] <= metrics["robustness"]["clean_accuracy"]
    assert "cnn_small" in out.stdout
