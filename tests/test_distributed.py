"""Data-parallel runs under torchrun (`cardkit --nproc 2`: two gloo processes on the CPU, one thread
each) against one process with the same global batch.

What must agree and how closely:
- evaluation is sharded by batch and its attack noise is seeded per batch, so a sharded evaluation
  gives exactly the numbers of one process (clean, PGD, APGD, IBP, CROWN, smoothing, corruptions);
- training: the two shards of a global batch give, averaged by DDP, the global batch's mean
  gradient; only the float summation order differs, so with attacks that start from the clean
  point (no per-process noise) the dense weights agree to float rounding (1e-5 here) and the
  final accuracies to a point or two;
- a killed 2-process run resumes to exactly the weights of an uninterrupted 2-process run, and a
  mid-epoch checkpoint of 2 processes is refused by 1 process in one line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cardkit.data import Augmentation, BatchLoader
from cardkit.data.splits import ArrayDataset
from cardkit.distributed import World, shard_slice
from cardkit.engine.checkpoint import load_checkpoint
from cardkit.engine.rundir import _alive  # what the run lock asks: zombies count as gone
from test_cli import cardkit_here

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "run", "seed": 3, "device": "cpu", "pipeline": ["pretrain", "prune", "finetune", "evaluate"],
    "threat": {"norm": "linf", "eps": 0.1},
    "data": {"name": "digits", "val_size": 100, "batch_size": 50},
    "model": {"name": "cnn_small"},
    "pretrain": {"epochs": 2, "checkpoint_every": 5, "eval_samples": 100,
                 "objective": {"name": "pgd_at", "steps": 2, "random_start": False},
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "prune": {"methods": [{"name": "hydra", "sparsity": 0.9}], "epochs": 1, "eval_samples": 100,
              "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "finetune": {"epochs": 1, "eval_samples": 100, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
    "evaluate": {"samples": 100, "attacks": [{"name": "pgd", "steps": 5}]},
}


def cardkit(*args, cwd, nproc=1, check=True) -> subprocess.CompletedProcess:
    """The command in one process (this one: no interpreter to start) or in `nproc` processes
    started by torchrun's launcher."""
    if nproc == 1:
        done = cardkit_here(*args, cwd=cwd, check=False)
    else:
        done = subprocess.run([sys.executable, "-m", "cardkit", "--nproc", str(nproc), *args], cwd=cwd,
                              capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same config trained by one process (runs/one) and by two (runs/two)."""
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    cardkit("run", "config.yaml", "--set", "name=one", "--no-progress", cwd=folder)
    cardkit("run", "config.yaml", "--set", "name=two", "--no-progress", cwd=folder, nproc=2)
    return folder


def weights(folder: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / stage / "checkpoints").model_state()


def metrics(folder: Path) -> dict:
    return json.loads((folder / "evaluate" / "metrics.json").read_text())


def test_two_processes_train_like_one(runs):
    one, two = weights(runs / "runs/one", "pretrain"), weights(runs / "runs/two", "pretrain")
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    for variant in ("", "hydra-0.9"):
        a, b = metrics(runs / "runs/one" / variant), metrics(runs / "runs/two" / variant)
        assert abs(a["robustness"]["clean_accuracy"] - b["robustness"]["clean_accuracy"]) <= 0.02
        assert abs(a["robustness"]["robust_accuracy"] - b["robustness"]["robust_accuracy"]) <= 0.02
    # the same training rows: rank 0 logged the global batch's loss and accuracy
    rows = [json.loads(line) for line in (runs / "runs/two/pretrain/metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (runs / "runs/one/pretrain/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for got, want in zip(rows, reference):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["train_accuracy"] == pytest.approx(want["train_accuracy"], abs=1e-9)
    assert load_checkpoint(runs / "runs/two/pretrain/checkpoints").meta["state"]["world_size"] == 2


def test_sharded_evaluation_equals_one_process(runs):
    attacks = "[{name: pgd, steps: 3}, {name: autoattack, version: custom, attacks: [apgd-ce]}]"
    overrides = ["--set", f"evaluate.attacks={attacks}",
                 "--set", "evaluate.verify=[ibp, crown]",
                 "--set", "evaluate.corruption.names=[gaussian_noise, fog]",
                 "--set", "evaluate.corruption.severities=[1, 5]", "--set", "evaluate.samples=60"]
    target = runs / "runs/one/hydra-0.9"
    cardkit("evaluate", "--checkpoint", str(target), *overrides, cwd=runs)
    single = metrics(target)
    cardkit("evaluate", "--checkpoint", str(target), *overrides, cwd=runs, nproc=2)
    sharded = metrics(target)
    for key in ("clean_accuracy", "robust_accuracy", "samples"):
        assert sharded["robustness"][key] == single["robustness"][key]
    assert [s["robust_accuracy"] for s in sharded["robustness"]["stages"]] == \
        [s["robust_accuracy"] for s in single["robustness"]["stages"]]
    assert len(single["robustness"]["stages"]) == 2
    assert [(v["method"], v["verified_accuracy"], v["samples"]) for v in sharded["verified"]] == \
        [(v["method"], v["verified_accuracy"], v["samples"]) for v in single["verified"]]
    assert sharded["corruption"]["mean_accuracy"] == single["corruption"]["mean_accuracy"]
    table = lambda: json.loads((target / "evaluate" / "corruption.json").read_text())["accuracy"]  # noqa: E731
    assert len(table()) == 2 and all(len(a) == 2 for a in table().values())
    # one write per evaluation: the earlier record moved to history/, nothing else
    assert len(list((target / "evaluate" / "history").glob("*-metrics.json"))) == 2

    smoothing = ["--method", "smoothing", "--sigma", "0.25", "--n0", "10", "--n", "100", "--samples", "20"]
    results = []
    for nproc in (1, 2):
        cardkit("certify", "--checkpoint", str(target), *smoothing, cwd=runs, nproc=nproc)
        results.append(json.loads((target / "certify" / "smoothing.json").read_text())["verification"])
    for key in ("samples", "certified_accuracy", "abstain_rate", "mean_radius"):
        assert results[0][key] == results[1][key]


def test_a_killed_two_process_run_resumes_to_the_same_weights(runs):
    config = runs / "pretrain-only.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "name": "killed", "pipeline": ["pretrain"]}))
    command = [sys.executable, "-m", "cardkit", "--nproc", "2", "run", config.name, "--no-progress"]
    process = subprocess.Popen(command, cwd=runs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = runs / "runs/killed/pretrain/checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (checkpoints / "last.json").is_file() and load_checkpoint(checkpoints).meta["state"]["batch"] > 5:
            break
        time.sleep(0.05)
    killed = [process.pid, *descendants(process.pid)]
    for pid in killed:  # the launcher and both ranks, at once
        os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in killed):  # SIGKILL takes effect asynchronously
        assert time.monotonic() < deadline, "the killed processes still run"
        time.sleep(0.01)
    saved = load_checkpoint(checkpoints).meta["state"]
    assert 0 < saved["batch"] and saved["epoch"] < 2, "the kill must land mid-run"

    refused = cardkit("run", config.name, "--no-progress", cwd=runs, check=False)
    assert refused.returncode == 2
    assert "mid-epoch by 2 process(es)" in refused.stderr and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("cardkit: error:")]
    assert len(errors) == 1 and "--nproc 2" in errors[0]

    cardkit("run", config.name, "--no-progress", cwd=runs, nproc=2)
    resumed, uninterrupted = weights(runs / "runs/killed", "pretrain"), weights(runs / "runs/two", "pretrain")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


EVERY_METHOD = {
    "name": "every", "device": "cpu", "pipeline": ["pretrain", "prune", "finetune", "evaluate"],
    "threat": {"norm": "linf", "eps": 0.1}, "data": {"name": "digits", "val_size": 100, "batch_size": 32},
    "pretrain": {"epochs": 1, "objective": {"name": "mixtrain", "steps": 2}},
    "prune": {"methods": [{"name": "hydra", "sparsity": 0.9, "quantize": {"bits": 4}},
                          {"name": "edge_popup", "sparsity": 0.5}, {"name": "biprop", "sparsity": 0.5},
                          {"name": "lottery", "sparsity": 0.9, "rounds": 2}, {"name": "gmp", "sparsity": 0.9},
                          {"name": "atmc", "sparsity": 0.9, "bits": 4}, {"name": "snip", "sparsity": 0.9}],
              "epochs": 2, "objective": {"name": "ibp"}},
    "finetune": {"epochs": 1, "objective": {"name": "trades", "steps": 2}, "augment": {"name": "augmix"}},
    "evaluate": {"attacks": [{"name": "pgd", "steps": 2}]},
}


def test_every_method_and_objective_trains_in_two_processes_with_the_ranks_in_step(tmp_path):
    """Each method's own steps (HYDRA/edge-popup/biprop scores, lottery rounds, GMP's schedule,
    ATMC's projections and codebooks, SNIP's saliency) under certified, TRADES and AugMix
    objectives; every epoch ends with a check that the ranks hold the same weights."""
    (tmp_path / "every.yaml").write_text(yaml.safe_dump(EVERY_METHOD))
    cardkit("run", "every.yaml", "--dry-run", "--no-progress", cwd=tmp_path, nproc=2)
    variants = ["hydra-0.9-4bit", "edge_popup-0.5", "biprop-0.5", "lottery-0.9", "gmp-0.9", "atmc-0.9-4bit", "snip-0.9"]
    for variant in variants:
        assert (tmp_path / "runs/every-dry-run" / variant / "evaluate/metrics.json").is_file(), variant


def _diverged_rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from cardkit.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only the check: the model and its name
    trainer.model, trainer.describe = torch.nn.Linear(2, 1), "prune"
    with torch.no_grad():
        trainer.model.weight.fill_(1.0 + rank * 1e-6)
        trainer.model.bias.fill_(0.0)
    try:
        trainer._check_ranks_agree(0)
        queue.put((rank, None))
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        queue.put((rank, str(error)))
    torch.distributed.destroy_process_group()


def test_ranks_whose_weights_drift_apart_are_stopped_in_one_line():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_diverged_rank, args=(r, port, queue)) for r in range(2)]
    for p in processes:
        p.start()
    errors = dict(queue.get() for _ in processes)
    for p in processes:
        p.join()
    assert all(e is not None and "weights differ after epoch 1" in e for e in errors.values())


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_every_rank_gets_its_part_of_the_global_batch_with_the_same_augmentation():
    dataset = ArrayDataset(torch.randint(0, 256, (23, 1, 6, 6), dtype=torch.uint8), torch.arange(23) % 10)
    augmentation = Augmentation(crop_padding=2, hflip=True)
    whole = BatchLoader(dataset, 10, shuffle=True, augmentation=augmentation)
    parts = [BatchLoader(dataset, 10, shuffle=True, augmentation=augmentation, shard=World(r, 3)) for r in range(3)]
    for k, batch in enumerate(whole.epoch(seed=11)):
        pieces = [list(p.epoch(seed=11))[k] for p in parts]
        assert torch.equal(torch.cat([x for x, _ in pieces]), batch[0])
        assert torch.equal(torch.cat([y for _, y in pieces]), batch[1])
        assert [len(y) for _, y in pieces] == [len(batch[1][shard_slice(len(batch[1]), r, 3)]) for r in range(3)]
        assert whole.global_size(k) == len(batch[1])
    assert [len(y) for _, y in parts[0].epoch(seed=11)] == [4, 4, 1]  # 10 -> 4, 3, 3; the last 3 -> 1, 1, 1


@pytest.mark.parametrize("n, size", [(10, 3), (3, 3), (2, 3), (0, 2), (7, 1)])
def test_shards_split_like_tensor_split(n, size):
    expected = [len(part) for part in torch.arange(n).tensor_split(size)]
    slices = [shard_slice(n, r, size) for r in range(size)]
    assert [s.stop - s.start for s in slices] == expected
    assert [s.start for s in slices] == [sum(expected[:r]) for r in range(size)]


def test_nproc_is_refused_where_it_would_only_repeat_the_work(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "cardkit", "--nproc", "2", "size", "--checkpoint",
                              str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("cardkit: error: --nproc 2: give N >= 1 processes for one of run, "
                                      "train, prune, evaluate, certify")
