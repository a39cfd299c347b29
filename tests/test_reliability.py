"""What a user's mistakes and faults cannot do: delete or overwrite files outside the run folder,
run twice in one folder, end in a traceback, or pass silently."""

import json
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from cardkit.cli import main
from cardkit.config import validate_config
from cardkit.data import load_dataset
from cardkit.engine.rundir import LOCK, MARKER, run_lock


def tiny_config(tmp_path, name="tiny", **extra):
    """A run of a few seconds on digits."""
    config = {"name": name, "output_dir": str(tmp_path / "runs"), "pipeline": ["pretrain", "evaluate"],
              "data": {"name": "digits", "train_size": 100, "test_size": 50, "batch_size": 50},
              "pretrain": {"epochs": 1, "eval_samples": 50}, "evaluate": {"attacks": [{"name": "pgd", "steps": 1}]}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_line(capsys):
    """The one error line (log lines may come before it), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cardkit: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", [".", "..", "..."])
@pytest.mark.parametrize("restart", [False, True])
def test_a_run_name_of_dots_is_refused_and_touches_nothing(tmp_path, capsys, name, restart):
    config = tiny_config(tmp_path)
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "keep.txt").write_text("a user's file")
    before = snapshot(tmp_path)
    assert main(["run", str(config), "--set", f"name={name}"] + ["--restart"] * restart) == 2
    assert "only dots" in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_restart_removes_only_a_folder_cardkit_created(tmp_path, capsys):
    config = tiny_config(tmp_path)
    mine = tmp_path / "runs" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("not cardkit's")
    before = snapshot(tmp_path)
    for restart in ([], ["--restart"]):
        assert main(["run", str(config), "--no-progress"] + restart) == 2
        assert "is not a cardkit run folder" in error_line(capsys)
        assert snapshot(tmp_path) == before

    # A folder cardkit made is emptied by --restart, and only that folder.
    (mine / "notes.txt").unlink()
    assert main(["run", str(config), "--no-progress"]) == 0
    assert (mine / MARKER).is_file() and not (mine / LOCK).exists()
    (mine / "stray.txt").write_text("inside the run folder")
    sibling = tmp_path / "runs" / "sibling.txt"
    sibling.write_text("beside the run folder")
    assert main(["run", str(config), "--no-progress", "--restart"]) == 0
    assert not (mine / "stray.txt").exists() and sibling.read_text() == "beside the run folder"
    assert (mine / "pretrain" / "metrics.jsonl").is_file()


def test_an_output_dir_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    config = tiny_config(tmp_path, output_dir=str(tmp_path / "afile" / "runs"))
    assert main(["run", str(config)]) == 2
    assert f"'{tmp_path / 'afile'}' is a file, not a folder" in error_line(capsys)
    assert (tmp_path / "afile").read_text() == "x"


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir.mkdir(parents=True)
        (run_dir / LOCK).write_text(json.dumps({"pid": holder.pid}))
        assert main(["run", str(config), "--no-progress"]) == 2
        line = error_line(capsys)
        assert f"in use by process {holder.pid}" in line and str(run_dir / LOCK) in line
        assert not (run_dir / "pretrain").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over, with a warning.
    assert main(["run", str(config), "--no-progress"]) == 0
    assert f"taking over a stale lock (process {holder.pid} no longer runs)" in capsys.readouterr().err
    assert not (run_dir / LOCK).exists()
    rows = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1


def test_a_lock_held_by_a_killed_process_not_yet_reaped_is_stale(tmp_path, capsys):
    """A SIGKILLed torchrun rank whose launcher died too stays a zombie until it is reaped: it
    answers signals, but its lock must not stop the resume."""
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        os.kill(holder.pid, 0)  # still there for signals
        run_dir.mkdir(parents=True)
        (run_dir / LOCK).write_text(json.dumps({"pid": holder.pid}))
        assert main(["run", str(config), "--no-progress"]) == 0
        assert f"taking over a stale lock (process {holder.pid} no longer runs)" in capsys.readouterr().err
    finally:
        holder.wait()


def test_the_lock_is_reentrant_and_released(tmp_path):
    with run_lock(tmp_path / "run"):
        with run_lock(tmp_path / "run"):  # a variant of a run this process holds
            pass
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK).exists()


@pytest.mark.parametrize("overrides,expected", [
    (["model.kwargs={in_channels: 1}"], "in_channels is set by the dataset"),
    (["model.kwargs={num_classes: 3, width: 2}"], "num_classes is set by the dataset"),
    (["prune.methods=[{name: hydra"], "not valid YAML at column 14"),
    (["data.name=[mnist"], "not valid YAML"),
])
def test_config_mistakes_are_one_line(tmp_path, capsys, overrides, expected):
    config = tiny_config(tmp_path)
    assert main(["run", str(config)] + [a for o in overrides for a in ("--set", o)]) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_empty_config_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["run", str(empty)]) == 2
    assert "is empty" in error_line(capsys)


@pytest.mark.parametrize("flags,expected", [
    (["--quantizer", "kmeans"], "--quantizer kmeans applies to quantized weights: add --bits"),
    (["--per-channel"], "--per-channel applies to quantized weights: add --bits"),
])
def test_quantizer_flags_without_bits_are_refused(tmp_path, capsys, flags, expected):
    assert main(["prune", "--checkpoint", str(tmp_path), "--method", "hydra", "--sparsity", "0.9"] + flags) == 2
    assert expected in error_line(capsys)


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    def offline(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("cardkit.data.download.open_url", offline)
    data_dir = tmp_path / "new" / "data"
    config = tiny_config(tmp_path, data={"name": "mnist", "data_dir": str(data_dir), "download": True})
    assert main(["run", str(config)]) == 2
    assert "download failed" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
    # cifar10 downloads one archive into data_dir: the same holds.
    with pytest.raises(Exception, match="missing .* in .*download failed"):
        load_dataset("cifar10", data_dir, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_corrupt_list_needs_no_out_and_survives_a_closed_pipe(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "cardkit", "corrupt", "--list"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.split()[:2] == ["gaussian_noise", "shot_noise"]
    closed = subprocess.run(f"'{sys.executable}' -m cardkit corrupt --list | (exec 0<&-; sleep 0)",
                            shell=True, capture_output=True, text=True)
    assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr


def test_corrupt_reads_named_test_files_and_the_train_split_alone(tmp_path, shared_data, capsys):
    args = ["corrupt", "--data", "cifar10", "--data-dir", str(shared_data), "--samples", "8",
            "--corruptions", "fog"]
    assert main(args + ["--files", "cifar-10-test-1k/test_batch_first1000.bin", "--out", str(tmp_path / "t")]) == 0
    assert "8 cifar10 test images" in capsys.readouterr().out
    assert main(args + ["--split", "train", "--out", str(tmp_path / "tr")]) == 0  # no test_batch.bin here
    assert "8 cifar10 train images" in capsys.readouterr().out
    assert main(["corrupt", "--data", "cifar10"]) == 2
    assert "give --out DIR" in error_line(capsys)


def test_prune_and_finetune_inherit_the_pretraining_objective():
    config = validate_config({"pretrain": {"objective": {"name": "pgd_at", "steps": 7, "eps_warmup_epochs": 3}}})
    for stage in (config.prune, config.finetune):
        assert stage.objective.name == "pgd_at" and stage.objective.steps == 7
        assert stage.objective.eps_warmup_epochs == 0  # a pretrained model needs no second ramp-up
    assert config.pretrain.objective.eps_warmup_epochs == 3
    certified = validate_config({"pretrain": {"objective": {"name": "crown_ibp", "warmup_epochs": 1,
                                                             "ramp_epochs": 5, "beta_end": 0.5}}})
    inherited = certified.finetune.objective
    assert (inherited.name, inherited.warmup_epochs, inherited.ramp_epochs, inherited.beta_end) == \
        ("crown_ibp", 0, 0, 0.5)
    explicit = validate_config({"pretrain": {"objective": {"name": "pgd_at"}},
                                "finetune": {"objective": {"name": "natural"}}})
    assert explicit.prune.objective.name == "pgd_at" and explicit.finetune.objective.name == "natural"
    assert validate_config({}).pretrain.objective.name == "natural"
    assert validate_config({}).prune.objective.name == "natural"


def test_cardkit_prune_keeps_the_robust_objective_and_says_when_it_switches(tmp_path, capsys):
    config = tiny_config(tmp_path, pretrain={"epochs": 1, "eval_samples": 50,
                                             "objective": {"name": "pgd_at", "steps": 1}})
    assert main(["run", str(config), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    prune = ["prune", "--checkpoint", str(run_dir), "--method", "hydra", "--sparsity", "0.5",
             "--set", "prune.epochs=1", "--set", "finetune.epochs=1", "--no-progress"]
    capsys.readouterr()
    assert main(prune) == 0
    settings = yaml.safe_load((run_dir / "hydra-0.5" / "variant.yaml").read_text())
    assert settings["prune"]["objective"]["name"] == "pgd_at"
    assert settings["finetune"]["objective"]["name"] == "pgd_at"
    assert "natural objective" not in capsys.readouterr().err
    assert main(prune[:4] + ["magnitude", "--sparsity", "0.99"] + prune[7:]
                + ["--set", "finetune.objective={name: natural}"]) == 0
    messages = capsys.readouterr().err.splitlines()
    assert [m for m in messages if "finetune: trains with the natural objective, but the model was "
            "pretrained with pgd_at" in m]
    assert [m for m in messages if "conv1 keeps 3 weights for 16 outputs" in m and "scope: global" in m]


@pytest.mark.parametrize("sparsity,scope,expected", [
    # cnn_small on 8x8x1: conv1 16x1x4x4, conv2 32x16x4x4, fc1 100x128, fc2 10x100
    (0.99, "layer", [("conv1", 3, 16)]),
    (0.995, "layer", [("conv1", 1, 16), ("fc1", 64, 100), ("fc2", 5, 10)]),
    (0.9, "layer", []),
    (0.995, "global", []),
])
def test_thin_layers_are_those_keeping_fewer_weights_than_outputs(sparsity, scope, expected):
    from cardkit.models import create_model
    from cardkit.prune import method_config, prune_model, thin_layers

    model = create_model("cnn_small", num_classes=10, in_channels=1, input_size=8)
    setup = prune_model(model, method_config("magnitude", sparsity=sparsity, scope=scope))
    assert thin_layers(model, setup.group) == expected


def test_a_deck_name_of_dots_is_refused(tmp_path):
    from cardkit.engine.deck import load_deck_config
    from cardkit.errors import CardkitError

    deck = tmp_path / "deck.yaml"
    deck.write_text(yaml.safe_dump({"name": "..", "cards": [{"checkpoint": "runs/x"}]}))
    with pytest.raises(CardkitError, match="name: given '..'; a run name of only dots"):
        load_deck_config(deck)


def test_a_config_whose_aliases_expand_to_billions_is_refused(tmp_path, capsys):
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9^9 values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert main(["run", str(bomb)]) == 2
    assert "expands to more than 100,000 values through its aliases" in error_line(capsys)
    # Aliases as configs use them are fine.
    shared = tmp_path / "shared.yaml"
    shared.write_text("pretrain: {objective: &adv {name: pgd_at, steps: 3}}\nfinetune: {objective: *adv}\n")
    from cardkit.config import load_config

    assert load_config(shared).finetune.objective.steps == 3
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert main(["run", str(big)]) == 2
    assert "more than a config holds" in error_line(capsys)


def test_variants_start_from_the_dense_checkpoint_the_report_shows(tmp_path, capsys):
    from cardkit.engine.checkpoint import load_checkpoint

    config = tiny_config(tmp_path, pretrain={"epochs": 3, "eval_samples": 50, "eval_pgd_steps": 1},
                         evaluate={"checkpoint": "best", "attacks": [{"name": "pgd", "steps": 1}]})
    assert main(["run", str(config), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    dense = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["checkpoint"]
    assert main(["prune", "--checkpoint", str(run_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--no-finetune", "--no-progress"]) == 0
    variant = load_checkpoint(run_dir / "magnitude-0.5" / "prune" / "checkpoints")
    assert run_dir / variant.meta["parent"] == Path(dense)
    assert Path(dense) == load_checkpoint(run_dir / "pretrain" / "checkpoints", "best").path
    # cardkit evaluate follows evaluate.checkpoint too, unless --best / the config says otherwise.
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run_dir)]) == 0
    assert json.loads((run_dir / "evaluate" / "metrics.json").read_text())["checkpoint"] == dense


def test_a_run_finds_its_data_from_another_folder(tmp_path, shared_data, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copytree(shared_data / "mnist", tmp_path / "data" / "mnist")
    config = tiny_config(tmp_path, data={"name": "mnist", "data_dir": "data", "download": False,
                                         "train_size": 100, "test_size": 50, "batch_size": 50})
    assert main(["run", str(config), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "runs" / "tiny")]) == 0
    stored = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert stored["data"]["data_dir"] == str(tmp_path / "data")


def test_a_later_evaluation_keeps_the_earlier_result_and_the_report_dates_it(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["run", str(config), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    first = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert main(["evaluate", "--checkpoint", str(run_dir), "--attack", "pgd", "--steps", "2"]) == 0
    assert main(["evaluate", "--checkpoint", str(run_dir), "--attack", "pgd", "--steps", "3"]) == 0
    history = sorted(p.name for p in (run_dir / "evaluate" / "history").iterdir())
    assert history == ["0001-metrics.json", "0002-metrics.json"]
    assert json.loads((run_dir / "evaluate" / "history" / "0001-metrics.json").read_text()) == first
    latest = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert latest["robustness"]["attack"] == "pgd-3, linf eps 0.1"
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].rstrip().endswith("evaluated (UTC)") and latest["recorded_at"] in table[2]


def test_a_path_in_a_config_file_is_read_from_the_file_s_folder(tmp_path, monkeypatch):
    from cardkit.config import load_config

    (tmp_path / "configs").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = tmp_path / "configs" / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "digits", "data_dir": "../data"},
                                    "evaluate": {"corruption": {"baseline": "base/corruption.json"}}}))
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.data.data_dir == str(tmp_path / "data")
    # A baseline is a run folder's result: like output_dir, it is read from the working folder.
    assert config.evaluate.corruption.baseline == str(elsewhere / "base" / "corruption.json")
    # A path typed on the command line, and the default, are read from the working folder.
    assert load_config(path, ["data.data_dir=mine"]).data.data_dir == str(elsewhere / "mine")
    assert load_config(None).data.data_dir == str(elsewhere / "data")
    absolute = tmp_path / "abs"
    path.write_text(yaml.safe_dump({"data": {"data_dir": str(absolute)}}))
    assert load_config(path).data.data_dir == str(absolute)
