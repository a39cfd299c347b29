"""Exact values of prune/masked.py: binary scale, quantized masked layers and what they store."""

import pytest
import torch
from torch import nn

from cardkit.compress.quantize import QuantSpec, quantize_uniform
from cardkit.prune.masked import add_masks, binary_scale


def test_binary_scale_is_the_mean_kept_magnitude():
    weight = torch.tensor([[3.0, -6.0], [1.0, 2.0]])
    assert binary_scale(weight, torch.tensor([[0.0, 1.0], [0.0, 0.0]])).item() == 6.0  # one kept
    assert binary_scale(weight, torch.tensor([[1.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(10 / 3)
    assert binary_scale(weight, torch.zeros(2, 2)).item() == 0.0


def _layer(spec):
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -1.2, 0.9, 0.1], [2.0, -0.5, 0.25, -2.0]]))
    (layer,) = add_masks(model)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    layer.set_quantizer(spec)
    return layer


def test_quantized_layer_follows_in_place_changes_of_weight_and_mask():
    layer = _layer(QuantSpec("uniform", 3, per_channel=True))
    expected = quantize_uniform(layer.weight, layer.mask, bits=3, per_channel=True).values
    assert torch.equal(layer.quantized().values, expected)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer.quantized().values, 2 * expected)
    with torch.no_grad():
        layer.mask.zero_()
    assert torch.equal(layer.quantized().values, torch.zeros(2, 4))
    (stored,) = layer.stored_tensors("0")
    assert stored.name == "0.weight" and stored.scheme == "uniform" and stored.per_channel is True


def test_kmeans_layer_fits_its_codebook_when_the_quantizer_is_set():
    layer = _layer(QuantSpec("kmeans", 1))
    # Kept weights 0.3, -1.2, 0.1, 2.0, -0.5, 0.25; one free centre, started at 0.4, the middle of
    # [-1.2, 2.0]. Lloyd: the values above 0.2 are {0.3, 0.25, 2.0}, mean 0.85; then those above
    # 0.425 are {2.0}, mean 2.0, where it stays.
    assert layer.codebook.tolist() == [0.0, 2.0]
    before = layer.quantized().values.clone()
    with torch.no_grad():
        layer.codebook.copy_(torch.tensor([0.0, 1.0]))
    assert not torch.equal(layer.quantized().values, before)
    assert torch.equal(layer.quantized().values, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_binary_layers_refuse_a_quantizer_and_store_signs():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    (layer,) = add_masks(model)
    layer.binary = True
    with pytest.raises(ValueError, match=r"^binary layers are quantized already \(1 bit\)$"):
        layer.set_quantizer(QuantSpec("uniform", 4))


def test_a_plain_masked_layer_stores_float_values_even_when_they_look_binary():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))  # +-alpha, but not a binary layer
    (layer,) = add_masks(model)
    (stored,) = layer.stored_tensors("0")
    assert (stored.name, stored.scheme, stored.quantized) == ("0.weight", "float", None)
    assert stored.values.tolist() == [[1.0, -1.0]]


# --- prune/report.py, methods.py, structured.py, snip.py, atmc.py: exact values ---------------


from cardkit.compress.quantize import QuantSpec as _QuantSpec  # noqa: E402
from cardkit.errors import CardkitError  # noqa: E402
from cardkit.models import create_model  # noqa: E402
from cardkit.objectives import NaturalConfig, build_objective  # noqa: E402
from cardkit.prune import method_config, prune_model, sparsity_report  # noqa: E402
from cardkit.prune.atmc import AtmcConfig, AtmcGroup, to_atmc  # noqa: E402
from cardkit.prune.methods import GMPConfig, LotteryConfig, QuantizeConfig, gmp_sparsity  # noqa: E402
from cardkit.prune.methods import PruneContext  # noqa: E402
from cardkit.prune.snip import SnipConfig  # noqa: E402
from cardkit.prune.structured import channel_masks  # noqa: E402


def test_sparsity_report_of_nested_layers_by_hand():
    # Layer "0.0" (a Linear inside a Sequential, 12 weights) keeps 5; layer "2" (6 weights) keeps 1.
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2))
    a, b = add_masks(model)
    with torch.no_grad():
        a.mask.zero_(), b.mask.zero_()
        a.mask.view(-1)[[0, 3, 4, 8, 11]] = 1
        b.mask.view(-1)[2] = 1
    report = sparsity_report(model)
    assert report["layers"] == [{"layer": "0.0", "weights": 12, "kept": 5, "sparsity": 1 - 5 / 12},
                                {"layer": "2", "weights": 6, "kept": 1, "sparsity": 1 - 1 / 6}]
    assert (report["prunable_weights"], report["kept_weights"]) == (18, 6)
    assert report["sparsity"] == 1 - 6 / 18
    assert report["kept_parameters"] == 6 + 3 + 2  # and the two biases


def test_sparsity_report_of_an_atmc_layer_adds_its_three_factors():
    model = nn.Sequential(nn.Linear(4, 4))
    (layer,) = to_atmc(model, rank=0.25, bits=2)  # U 4x1, V 1x4, C 4x4
    with torch.no_grad():
        layer.mask_u.copy_(torch.tensor([[1.0], [0.0], [1.0], [1.0]]))  # 3
        layer.mask_c.zero_()
        layer.mask_c.view(-1)[[0, 15]] = 1  # 2; V keeps all 4
    report = sparsity_report(model)
    assert report["layers"] == [{"layer": "0", "weights": 16, "kept": 9, "sparsity": 1 - 9 / 16}]
    assert report["kept_parameters"] == 9 + 4


def test_lottery_rounds_follow_the_geometric_schedule():
    # Keeping 1/8 in 3 rounds keeps 1/2 of the remaining weights each round: 1/2, 1/4, 1/8 kept.
    config = LotteryConfig(sparsity=0.875, rounds=3)
    assert [config.round_sparsity(r) for r in (1, 2, 3)] == pytest.approx([0.5, 0.75, 0.875], abs=1e-12)


def test_gmp_reaches_the_final_sparsity_at_end_step_off_the_update_grid():
    # end_step 25 with updates every 10 steps: the schedule holds 0.9 x (1 - 0.2^3) from step 20,
    # and is the final sparsity from step 25 on.
    config = GMPConfig(sparsity=0.9, frequency=10, end_step=25)
    assert gmp_sparsity(24, config, 30) == pytest.approx(0.9 * (1 - 0.2 ** 3), abs=1e-12)
    assert gmp_sparsity(25, config, 30) == 0.9


def test_quantize_config_passes_per_channel_on():
    assert QuantizeConfig(bits=4, per_channel=True).spec() == _QuantSpec("uniform", 4, True)
    assert QuantizeConfig(scheme="kmeans", bits=3).spec() == _QuantSpec("kmeans", 3, False)


@pytest.mark.parametrize("name", ["edge_popup", "biprop"])
def test_random_subnetworks_train_their_scores_at_the_configured_scope(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    setup = prune_model(model, method_config(name, sparsity=0.5, scope="global"))
    assert setup.model is model and setup.trains is True and setup.group.scope == "global"
    # One threshold over both layers: 60 of the 120 weights, not 50 + 10 by layer.
    with torch.no_grad():
        for layer in setup.group.layers:
            layer.scores.copy_(torch.arange(layer.scores.numel(), dtype=torch.float32).view_as(layer.scores)
                               + (100 if layer.weight.shape[0] == 2 else 0))
        setup.group.refresh()
    kept = [int(layer.mask.sum()) for layer in setup.group.layers]
    assert kept == [40, 20]


def test_global_channel_masks_at_full_sparsity_keep_one_channel_per_layer():
    # Sparsity 0.999 of 148 channels keeps round(0.148) = 0, at least 1: the best channel over all
    # layers (one of conv1's two large filters), then the best channel of each layer left empty.
    model = create_model("cnn_small", 10, 1, 28)
    with torch.no_grad():
        model.conv1.weight.mul_(0.01)
        model.conv1.weight[:2] = 1.0
    masks = channel_masks(model, 0.999, scope="global")
    assert [int(m.sum()) for m in masks.values()] == [1, 1, 1]
    assert bool(masks["conv1"][:2].any())


def test_snip_without_batches_names_the_fix():
    model = nn.Sequential(nn.Linear(2, 2))
    context = PruneContext(model, iter([]), build_objective(NaturalConfig(), None))
    with pytest.raises(CardkitError, match=r"^snip: the context gave no training batch; give it at least one "
                                           r"\(x, y\) batch$"):
        prune_model(model, SnipConfig(sparsity=0.5), context)


def test_a_restored_atmc_group_keeps_its_masks_on_the_schedule():
    # Fine-tuning from a checkpoint: the group is frozen, so a step at the projection interval
    # neither re-projects nor quantizes anything.
    model = nn.Sequential(nn.Linear(4, 4))
    layers = to_atmc(model, rank=0.25, bits=2)
    group = AtmcGroup(model, layers, AtmcConfig(sparsity=0.5, prune_interval=1, quant_interval=1), 32 * 20)
    with torch.no_grad():
        layers[0].c.copy_(torch.arange(16.0).view(4, 4))
    masks = [m.clone() for _, m, *_ in group.factors()]
    group.restored()
    assert group.frozen is True
    group.after_step(1, 10)
    assert all(torch.equal(a, m) for a, (_, m, *_) in zip(masks, group.factors()))


def _atmc_group(seed, ratio, shape=(6, 6)):
    from cardkit.compress.size import dense_bits

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(*shape))
    dense = dense_bits(model)
    return AtmcGroup(model, to_atmc(model, 0.25, 2), AtmcConfig(size_ratio=ratio, bits=2), dense)


@pytest.mark.parametrize("seed,ratio", [(1, 0.25), (1, 0.35), (1, 0.45), (2, 0.45), (1, 0.6)])
def test_atmc_size_budget_is_the_largest_count_that_fits(seed, ratio):
    # A 6x6 Linear (36 weights; U 6x2, V 2x6, C 6x6; 6 float32 biases = 192 fixed bits): the budget
    # fits the target and one entry more would not (at 0.6 every weight fits: 36).
    group = _atmc_group(seed, ratio)
    assert group.fixed_bits == 32 * 6 and group.dense_bits == 32 * 42
    group.size_budget()
    k, target = group.budget, ratio * 32 * 42
    assert group._trial_bits(k) <= target
    assert k == 36 if ratio == 0.6 else group._trial_bits(k + 1) > target


def test_atmc_size_budget_out_of_reach_names_the_smallest_ratio():
    # Linear(9, 10): 10 biases, 320 of 3200 dense bits even with nothing kept: ratio 0.1.
    group = _atmc_group(0, 0.05, (9, 10))
    with pytest.raises(CardkitError, match=r"^atmc: size_ratio 0.05 is out of reach: with no weight kept, the "
                                           r"parameters that stay float32 \(biases, normalization\) alone take "
                                           r"320 of 3200 dense bits, a ratio of 0.1; set size_ratio to at "
                                           r"least 0.1$"):
        group.size_budget()
    # Exactly the fixed bits is within reach: nothing is kept.
    group = _atmc_group(0, 0.1, (9, 10))
    assert group.target_bits == 320.0
    group.size_budget()
    assert group.budget == 0


def test_one_shot_magnitude_masks_are_frozen():
    # The mask is computed once from the weights: changing the scores afterwards changes nothing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    setup = prune_model(model, method_config("magnitude", sparsity=0.5))
    (layer,) = setup.group.layers
    mask = layer.mask.clone()
    with torch.no_grad():
        layer.scores.copy_(-layer.weight.abs())
    setup.group.refresh()
    assert setup.group.frozen is True and torch.equal(layer.mask, mask)


def test_sparsity_report_of_a_single_weight():
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    assert sparsity_report(model)["sparsity"] == 0.0


def test_structured_pruning_refusals_name_the_bad_value():
    model = create_model("cnn_small", 10, 1, 28)
    for kwargs, message in [({"sparsity": True}, r"^sparsity=True is invalid; give the fraction of channels to "
                                                 r"remove, a number in \[0, 1\]$"),
                            ({"sparsity": 0.5, "scope": "all"}, r"^scope='all' is invalid; use 'layer' or 'global'$"),
                            ({"sparsity": 0.5, "source": "grad"},
                             r"^source='grad' is invalid; use 'weight' or 'scores'$"),
                            ({"sparsity": 0.5, "source": "scores"},
                             r"^layer 'conv1' \(Conv2d\) has no scores; call cardkit.prune.add_masks\(model\) first "
                             r"or use source='weight'$")]:
        with pytest.raises(CardkitError, match=message):
            channel_masks(model, **kwargs)


def test_a_structurally_rebuilt_model_restores_without_masks_and_keeps_frozen_weights_frozen():
    from cardkit.prune.methods import HydraConfig, MagnitudeConfig, restore_method
    from cardkit.prune.masked import MaskedLayer
    from cardkit.prune.structured import rebuild

    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 28)
    add_masks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    smaller = rebuild(model, channel_masks(model, 0.5))
    assert all(not p.requires_grad for p in smaller.parameters())
    for config in (MagnitudeConfig(sparsity=0.5, scope="structured"), HydraConfig(sparsity=0.5, scope="structured")):
        setup = restore_method(smaller, config)
        assert setup.group is None and setup.model is smaller and setup.trains is False
        assert not any(isinstance(m, MaskedLayer) for m in smaller.modules())


@pytest.mark.parametrize("iterations,centre", [(20, 4.0), (0, 5.0)])
def test_atmc_admm_quantizes_the_kept_entries_with_the_configured_k_means(iterations, centre):
    # One free centre (1 bit) for C's kept entries 3, 3, 3, 7: it starts at the middle of [3, 7],
    # 5, where all four are nearer than to 0; Lloyd moves it to their mean 4, where it stays.
    # With no iterations it stays at 5. U and V keep nothing.
    model = nn.Sequential(nn.Linear(4, 2))
    layers = to_atmc(model, rank=0.5, bits=1)
    group = AtmcGroup(model, layers, AtmcConfig(sparsity=0.5, bits=1, kmeans_iterations=iterations), 32 * 10)
    layer = layers[0]
    with torch.no_grad():
        layer.mask_u.zero_(), layer.mask_v.zero_()
        layer.c.copy_(torch.tensor([[3.0, 3.0, 3.0, 7.0], [9.0, 9.0, 9.0, 9.0]]))
        layer.mask_c.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    group.start_admm()
    assert layer.z_c.tolist() == [[centre] * 4, [0.0] * 4]
    assert layer.codebook_c.tolist() == [0.0, centre] and not layer.dual_c.any()
    assert not layer.z_u.any() and not layer.z_v.any()
    if iterations:
        # theta moves to 3, 3, 3, 9; warm-started at 4, the centre goes to 4.5. The dual gains
        # theta - Z on the kept entries.
        with torch.no_grad():
            layer.c[0, 3] = 9.0
        group.admm_update()
        assert layer.z_c[0].tolist() == [4.5] * 4
        assert layer.dual_c.tolist() == [[-1.5, -1.5, -1.5, 4.5], [0.0] * 4]


def test_structured_hydra_trains_scores_under_a_layer_wise_mask():
    setup = prune_model(create_model("cnn_small", 10, 1, 28), method_config("hydra", sparsity=0.5, scope="structured"))
    assert setup.group.scope == "layer" and setup.finish is not None
    assert prune_model(nn.Sequential(nn.Linear(4, 4)),
                       method_config("hydra", sparsity=0.5, scope="global")).group.scope == "global"
