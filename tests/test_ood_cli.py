"""Out-of-distribution robustness from the command line on real MNIST: AugMix and Gaussian-noise
CARDs through the pipeline, corruption evaluation with mCE, a CARD-Deck built and evaluated,
`cardkit corrupt` in the official layout, and a Fourier heat map."""

import json

import numpy as np
import pytest
from PIL import Image

from test_cli import cardkit_here as cardkit  # the commands' own code, in this process


def card_config(tmp_path, shared_data, name, augment, baseline=None):
    config = tmp_path / f"{name}.yaml"
    corruption = "{names: [gaussian_noise, fog], severities: [1, 5]" + (
        f", baseline: {baseline}}}" if baseline else "}")
    config.write_text(f"""
name: {name}
output_dir: {tmp_path / 'runs'}
pipeline: [pretrain, prune, finetune, evaluate]
threat: {{norm: linf, eps: 0.1}}
data: {{name: mnist, data_dir: {shared_data}, download: false, train_size: 1000, test_size: 200,
        batch_size: 100}}
pretrain: {{epochs: 2, augment: {augment}, optimizer: {{name: adam, lr: 0.003}}}}
prune: {{methods: [{{name: magnitude, sparsity: 0.9}}]}}
finetune: {{epochs: 1, augment: {augment}, optimizer: {{name: adam, lr: 0.001}}}}
evaluate: {{attacks: [{{name: pgd, steps: 2}}], corruption: {corruption}}}
""")
    return config


@pytest.mark.slow
def test_cards_deck_corruptions_and_fourier_on_mnist(tmp_path, shared_data):
    runs = tmp_path / "runs"
    cardkit("run", card_config(tmp_path, shared_data, "noise", "{name: gaussian, sigma: 0.3}"), "--no-progress")
    baseline = runs / "noise" / "evaluate" / "corruption.json"
    out = cardkit("run", card_config(tmp_path, shared_data, "augmix", "{name: augmix, width: 2}", baseline),
                  "--no-progress")
    assert "outputs:" in out.stdout

    # Each card records its domain; the evaluate stage measures corruptions and mCE.
    metrics = json.loads((runs / "augmix" / "magnitude-0.9" / "evaluate" / "metrics.json").read_text())
    assert metrics["domain"]["name"] == "augmix" and metrics["domain"]["width"] == 2
    corruption = json.loads((runs / "augmix" / "magnitude-0.9" / "evaluate" / "corruption.json").read_text())
    assert set(corruption["accuracy"]) == {"gaussian_noise", "fog"} and corruption["samples"] == 200
    assert all(len(row) == 2 and all(0 <= a <= 1 for a in row) for row in corruption["accuracy"].values())
    assert corruption["clean_accuracy"] > 0.5 and corruption["mce"] > 0
    noise_card = json.loads((runs / "noise" / "magnitude-0.9" / "evaluate" / "corruption.json").read_text())
    assert noise_card["accuracy"]["gaussian_noise"][1] > 0.3  # trained on noise, it tolerates noise

    deck = tmp_path / "deck.yaml"
    deck.write_text(f"""
name: deck
output_dir: {runs}
cards:
  - {{checkpoint: {runs / 'noise' / 'magnitude-0.9'}, name: noise}}
  - {{checkpoint: {runs / 'augmix' / 'magnitude-0.9'}, name: augmix}}
gating: adaptive
spectrum_samples: 500
""")
    assert "deck written" in cardkit("deck", "build", deck).stdout
    out = cardkit("deck", "evaluate", "--deck", runs / "deck", "--corruptions", "gaussian_noise", "fog",
                  "--severities", "1", "5", "--samples", "100").stdout
    assert "mean corruption acc" in out and "2 cards" in out
    report = json.loads((runs / "deck" / "evaluate" / "metrics.json").read_text())
    assert set(report["results"]) == {"deck", "noise", "augmix"}
    memory = report["memory"]
    assert memory["deck_bytes"] < memory["dense_model_bytes"]  # two 90%-sparse cards beat one dense model
    fixed = cardkit("deck", "evaluate", "--deck", runs / "deck", "--gating", "fixed", "--corruptions", "fog",
                    "--severities", "3", "--samples", "100")
    assert "fixed gating" in fixed.stdout

    # The official layout, written by `cardkit corrupt`, is read back by the evaluation.
    suite = tmp_path / "mnist-c"
    cardkit("corrupt", "--data", "mnist", "--data-dir", shared_data, "--samples", "40",
            "--corruptions", "fog", "impulse_noise", "--out", suite)
    assert np.load(suite / "fog.npy").shape == (200, 28, 28, 1) and np.load(suite / "labels.npy").shape == (200,)
    cardkit("deck", "evaluate", "--deck", runs / "deck", "--suite", suite, "--corruptions", "fog")
    source = json.loads((runs / "deck" / "evaluate" / "metrics.json").read_text())["results"]["deck"]["source"]
    assert source == str(suite)

    out = cardkit("fourier", "--checkpoint", runs / "augmix" / "magnitude-0.9", "--samples", "40").stdout
    assert "clean error" in out
    heatmap = json.loads((runs / "augmix" / "magnitude-0.9" / "fourier" / "heatmap.json").read_text())
    assert np.array(heatmap["error"]).shape == (28, 28)
    Image.open(runs / "augmix" / "magnitude-0.9" / "fourier" / "heatmap.png").verify()


@pytest.mark.parametrize("args, expected", [
    (["corrupt", "--data", "digits", "--corruptions", "fgo", "--out", "x"], "unknown corruption 'fgo'"),
    (["deck", "evaluate", "--deck", "nowhere"], "no deck in 'nowhere'"),
])
def test_ood_user_errors(tmp_path, args, expected):
    result = cardkit(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
