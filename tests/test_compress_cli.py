"""Quantized pruning, size accounting and compressed files from the command line on real MNIST:
the exported file reproduces the evaluated model's outputs and accuracy exactly."""

import json

import pytest
import torch

import cardkit
from cardkit.config import load_config
from cardkit.data import BatchLoader
from cardkit.engine.pipeline import _find_checkpoint, load_data, model_from_checkpoint
from conftest import SHARED_DATA
from test_cli import cardkit as run_cli
from test_cli import cardkit_here

VARIANTS = {
    "magnitude-0.95-8bit": "{name: magnitude, sparsity: 0.95, quantize: {bits: 8}}",
    "hydra-0.9-4bit-kmeans": "{name: hydra, sparsity: 0.9, quantize: {bits: 4, scheme: kmeans}}",
    "biprop-0.9": "{name: biprop, sparsity: 0.9}",
    "atmc-0.95-4bit": "{name: atmc, sparsity: 0.95, bits: 4, prune_interval: 4, quant_interval: 3}",
}


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    shared = SHARED_DATA
    tmp = tmp_path_factory.mktemp("compress")
    config = tmp / "compress.yaml"
    config.write_text(f"""
name: compress
output_dir: {tmp / 'runs'}
pipeline: [pretrain, prune, finetune, evaluate]
data: {{name: mnist, data_dir: {shared}, download: false, train_size: 1000, test_size: 200, batch_size: 100}}
pretrain: {{epochs: 2, optimizer: {{name: adam, lr: 0.003}}}}
prune: {{epochs: 1, optimizer: {{name: adam, lr: 0.01}}, methods: [{', '.join(VARIANTS.values())}]}}
finetune: {{epochs: 1, optimizer: {{name: adam, lr: 0.001}}}}
evaluate: {{attacks: [{{name: pgd, steps: 2}}]}}
""")
    out = run_cli("run", config, "--no-progress")
    return tmp, config, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_file_reproduces_the_evaluated_model(compressed_run, variant):
    tmp, config, stdout = compressed_run
    folder = tmp / "runs" / "compress" / variant
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    assert variant in stdout and f"{metrics['model']['compression_ratio']:.1f}x" in stdout

    out = cardkit_here("export", "--checkpoint", folder, "--out", tmp / f"{variant}.card").stdout
    assert "outputs differ by at most 0" in out
    written = (tmp / f"{variant}.card").stat().st_size
    assert metrics["size"]["bytes"] <= written <= metrics["size"]["bytes"] + 4096
    assert metrics["model"]["size_bytes"] == metrics["size"]["bytes"]
    assert metrics["size"]["bytes"] < metrics["size"]["dense_bytes"] / 8

    loaded = cardkit.load_artifact(tmp / f"{variant}.card")
    model = model_from_checkpoint(_find_checkpoint(folder, "last")).eval()
    test = load_data(load_config(config)).test
    correct, n = 0, 0
    for x, y in BatchLoader(test, 100).epoch():
        with torch.no_grad():
            logits = loaded(x)
            assert torch.equal(logits, model(x))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    assert correct / n == pytest.approx(metrics["robustness"]["clean_accuracy"], abs=1e-9)
    bits = {"magnitude-0.95-8bit": 8, "hydra-0.9-4bit-kmeans": 4, "biprop-0.9": 1, "atmc-0.95-4bit": 4}[variant]
    for entry in json.loads(cardkit_here("size", "--checkpoint", folder, "--json").stdout)["tensors"]:
        assert 1 <= entry["value_bits"] <= bits  # every stored tensor is quantized
    if variant.startswith("atmc"):  # U, V and C hold the l0 budget together
        assert sum(layer["kept"] for layer in metrics["layers"]) <= round(0.05 * sum(
            layer["weights"] for layer in metrics["layers"]))
        return
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert getattr(loaded, name).weight.unique().numel() <= 2 ** bits + (bits == 1)  # +-alpha and 0


@pytest.mark.slow
def test_size_command_prints_every_tensor_and_the_ratio(compressed_run):
    tmp, _, _ = compressed_run
    folder = tmp / "runs" / "compress" / "hydra-0.9-4bit-kmeans"
    out = cardkit_here("size", "--checkpoint", folder).stdout
    assert "fc1.weight" in out and "kmeans" in out and "compression" in out
    report = json.loads(cardkit_here("size", "--checkpoint", folder, "--json").stdout)
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    assert report["bytes"] == metrics["size"]["bytes"]
    # k-means: the centres in use (at most 16) and codes just wide enough to index them
    assert all(t["value_bits"] <= 4 and t["tables_bytes"] <= 16 * 4 for t in report["tensors"])


def test_export_errors_are_one_line(compressed_run, tmp_path):
    bad = tmp_path / "bad.card"
    bad.write_bytes(b"not a model")
    result = cardkit_here("export", "--checkpoint", tmp_path / "missing", "--out", bad, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
