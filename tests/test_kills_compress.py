"""Exact values of compress/ (quantizers, size accounting), computed by hand.

Each test pins numbers that a plausible slip in quantize.py or size.py would change (a mask not
passed on, a clamp of 2 instead of 1, a sign test > instead of >=, a lost dtype, a name left out).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cardkit.compress import model_size
from cardkit.compress.quantize import QuantSpec, _config_bits, quantize_binary, quantize_kmeans, sqnr_db
from cardkit.models import create_model, model_from_arch


def test_uniform_spec_takes_its_scale_from_the_kept_weights_only():
    # bits 3: levels k x scale, k in -3..3; kept |w| max is 2 (the 4 is masked), scale 2/3.
    weight = torch.tensor([[4.0, -1.0, 2.0, 0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    q = QuantSpec("uniform", 3)(weight, mask)
    scale = 2 / 3
    # -1 / scale = -1.5 rounds half to even -> -2; 0.5 / scale = 0.75 -> 1.
    assert torch.allclose(q.values, torch.tensor([[0.0, -2 * scale, 2.0, scale]]), atol=1e-7, rtol=0)
    assert q.codes.tolist() == [[3, 1, 6, 4]]  # code = k + 3; the removed weight holds the zero level
    assert torch.allclose(q.codebook, torch.arange(-3, 4, dtype=torch.float32) * scale)


def test_config_bits_reports_the_check_bits_message():
    with pytest.raises(ValueError, match=r"^quantization bits must be an integer from 1 to 8, got 9$"):
        _config_bits(9)
    assert _config_bits(4) == 4


def test_binary_alpha_is_the_mean_kept_magnitude_and_zero_maps_to_plus_alpha():
    # Per channel: row 0 keeps 0, -3, 1 (alpha 4/3); row 1 keeps only -5 (alpha 5, one weight).
    weight = torch.tensor([[0.0, -3.0, 1.0], [2.0, -5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    q = quantize_binary(weight, mask, per_channel=True)
    a = 4 / 3
    assert torch.allclose(q.codebook, torch.tensor([[-a, a], [-5.0, 5.0]]))
    assert torch.allclose(q.values, torch.tensor([[a, -a, a], [0.0, -5.0, 0.0]]))
    assert q.codes.tolist() == [[1, 0, 1], [1, 0, 1]] and q.bits == 1


def test_sqnr_in_decibels_and_its_limits():
    # |ref|^2 = 0.25, |ref - approx|^2 = 0.0625: 10 log10(4) dB.
    assert sqnr_db(torch.tensor([0.5]), torch.tensor([0.25])) == pytest.approx(10 * math.log10(4), abs=1e-12)
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25), abs=1e-12)
    assert sqnr_db(torch.zeros(2), torch.tensor([0.1, 0.0])) == -math.inf
    assert sqnr_db(torch.tensor([1.0]), torch.tensor([1.0])) == math.inf


def test_kmeans_warm_start_keeps_float32_and_pins_centre_zero():
    init = torch.tensor([0.5, -1.0, 1.0, 2.0], dtype=torch.float64)
    weight = torch.tensor([0.1, -0.9, 1.2, 2.2, 0.0])
    q = quantize_kmeans(weight, bits=2, iterations=0, init=init)
    assert q.codebook.dtype == torch.float32
    assert q.codebook.tolist() == [0.0, -1.0, 1.0, 2.0]
    assert q.codes.tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match=r"^init has 3 centres, 4 are needed$"):
        quantize_kmeans(weight, bits=2, init=torch.zeros(3))


def test_size_report_of_a_tiny_pruned_layer_by_hand():
    layer = nn.Linear(8, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 2.0]]))
        layer.bias.fill_(0.5)
    report = model_size(nn.Sequential(layer))
    # Kept positions 0 and 7: gaps 1, 7. Width 3 needs no escape: 2 entries x 3 bits = 6 bits,
    # less than the 8-bit bitmap (width 1: 8 entries, width 2: 4 entries, both 8 bits).
    # Values 2 x 32 bits, the bias 32 bits: 102 bits in all; the dense model 9 x 32 = 288.
    (t,) = report.tensors
    assert (t.name, t.weights, t.kept, t.scheme, t.value_bits) == ("0.weight", 8, 2, "float", 32)
    assert (t.values, t.positions, t.position_format, t.tables, t.bits) == (64, 6, "gaps", 0, 70)
    assert (report.other_bits, report.bits, report.bytes, report.dense_bits) == (32, 102, 13, 288)
    assert report.compression_ratio == 288 / 102
    assert report.to_dict() == {
        "bytes": 13, "dense_bytes": 36, "compression_ratio": 288 / 102, "values_bytes": 8.0,
        "positions_bytes": 0.75, "tables_bytes": 0.0, "other_bytes": 4.0,
        "tensors": [{"name": "0.weight", "weights": 8, "kept": 2, "scheme": "float", "value_bits": 32,
                     "values_bytes": 8.0, "positions_bytes": 0.75, "position_format": "gaps",
                     "tables_bytes": 0.0, "bytes": 9}]}


def test_dense_bits_of_a_structured_model_are_those_of_the_full_architecture():
    net = create_model("cnn_small", 10, 1, 8)
    full = 32 * (sum(p.numel() for p in net.parameters())
                 + sum(b.numel() for b in net.buffers() if b.is_floating_point()))
    smaller = model_from_arch({**net.arch, "structured": {"conv1": 3}})
    assert model_size(net).dense_bits == full
    assert model_size(smaller).dense_bits == full
    assert model_size(smaller).bits < full


def test_kmeans_initial_centres_sit_at_the_middles_of_equal_cells():
    # Kept values -1, 0.5, 2: three cells of width 1 over [-1, 2], middles -0.5, 0.5, 1.5.
    q = quantize_kmeans(torch.tensor([2.0, -1.0, 0.5, 9.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]),
                        bits=2, iterations=0)
    assert torch.allclose(q.codebook, torch.tensor([0.0, -0.5, 0.5, 1.5]))
    assert q.codes.tolist() == [3, 1, 2, 0] and q.bits == 2  # the removed weight holds code 0


def test_one_lloyd_step_by_hand():
    # Centres 0, 1, 5, 10 (midpoints 0.5, 3, 7.5): 1.2 -> centre 1, 4.0 -> centre 5, centre 10 empty.
    # One step: the one-value clusters move onto their value, the empty one keeps its centre.
    q = quantize_kmeans(torch.tensor([1.2, 4.0]), bits=2, iterations=1, init=torch.tensor([0.0, 1, 5, 10]))
    assert torch.allclose(q.codebook, torch.tensor([0.0, 1.2, 4.0, 10.0]))
    # A value on a midpoint goes to the lower centre, in the step as in the assignment: 1.0 lies
    # halfway between 0 and 2 and joins the zero centre, so centre 2 moves to 3 (not to 2).
    q = quantize_kmeans(torch.tensor([1.0, 3.0]), bits=1, iterations=1, init=torch.tensor([0.0, 2.0]))
    assert q.codebook.tolist() == [0.0, 3.0] and q.codes.tolist() == [0, 1]


def test_packing_error_messages():
    from cardkit.compress.packing import Positions, decode_positions, unpack_uint, _check_width
    with pytest.raises(ValueError, match=r"^width must be an integer in 1\.\.32, got True$"):
        _check_width(True)
    with pytest.raises(ValueError, match=r"^count must be >= 0, got -1$"):
        unpack_uint(np.zeros(1, np.uint8), 3, -1)
    with pytest.raises(ValueError, match=r"^3 values of 5 bits need 2 bytes, got 1$"):
        unpack_uint(np.zeros(1, np.uint8), 5, 3)
    cases = [(Positions("sparse", 4, np.zeros(0, np.uint8)), r"^unknown positions format 'sparse'$"),
             (Positions("dense", -1, np.zeros(0, np.uint8)), r"^negative number of weights -1$"),
             (Positions("dense", 4, np.zeros(1, np.uint8)), r"^dense positions store no data, got 1 bytes$"),
             (Positions("bitmap", 9, np.zeros(1, np.uint8)), r"^bitmap of 9 weights needs 2 bytes, got 1$"),
             (Positions("gaps", 4, np.zeros(0, np.uint8), 2, -1), r"^negative number of gap entries -1$"),
             (Positions("gaps", 4, np.zeros(2, np.uint8), 2, 3), r"^3 gap entries of 2 bits need 1 bytes, got 2$"),
             # entries 3, 2 (width 2): positions 2 and 4, and 4 is past weights 0..3.
             (Positions("gaps", 4, np.array([0b1011], np.uint8), 2, 2),
              r"^gap entries reach position 4, past the 4 weights$")]
    for p, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_positions(p)
    # Entries 3, 1 reach position 3, the last of 4 weights: valid.
    assert decode_positions(Positions("gaps", 4, np.array([0b0111], np.uint8), 2, 2)).tolist() == [
        False, False, True, True]


def test_packing_accepts_plain_python_sequences():
    from cardkit.compress.packing import Positions, decode_positions, encode_positions, unpack_uint
    assert unpack_uint([0b10110001], 4, 2).tolist() == [1, 11]
    assert decode_positions(Positions("bitmap", 3, [0b101])).tolist() == [True, False, True]
    # A float mask is a mask: nonzero is kept (bitmap of 16 weights, 9 kept, 2 bytes).
    mask = np.array([1.0, 0.0] * 4 + [1.0] * 8)
    p = encode_positions(mask)
    assert p.format == "bitmap" and p.bits == 16 and decode_positions(p).tolist() == (mask != 0).tolist()


# --- compress/artifact.py: a user model's file, its fingerprint, and the instance checks --------

import hashlib  # noqa: E402
import re  # noqa: E402
import json  # noqa: E402

from safetensors.numpy import load as _load_arrays  # noqa: E402
from safetensors.numpy import save as _save_arrays  # noqa: E402

from cardkit.compress.artifact import fingerprint, load_artifact, plain_shapes, save_artifact  # noqa: E402
from cardkit.errors import CardkitError  # noqa: E402
from cardkit.prune.atmc import to_atmc  # noqa: E402
from cardkit.prune.masked import add_masks  # noqa: E402


def test_fingerprint_is_the_sha256_of_the_compact_json_of_names_and_shapes():
    # Written out by hand: sorted names, compact separators. Files record this value, so a change
    # of format would refuse every user-model file written before it.
    model = nn.Sequential(nn.Linear(2, 3))
    text = '[["0.bias",[3]],["0.weight",[3,2]]]'
    assert fingerprint(model) == hashlib.sha256(text.encode()).hexdigest()


def test_plain_shapes_of_a_factorized_model_are_those_of_its_dense_model():
    dense = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    factorized = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    to_atmc(factorized, rank=0.5, bits=2)
    assert plain_shapes(factorized) == plain_shapes(dense) == {
        "0.bias": (4,), "0.weight": (4, 6), "2.bias": (2,), "2.weight": (2, 4)}
    assert fingerprint(factorized) == fingerprint(dense)


def _user_file(tmp_path, edit=None):
    model = nn.Sequential(nn.Linear(3, 2))
    path = tmp_path / "m.card"
    save_artifact(model, path)
    if edit is not None:  # edit the header (the checksum covers the tensors only)
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"])
        edit(header)
        path.write_bytes(_save_arrays(dict(_load_arrays(data)), metadata={"cardkit": json.dumps(header)}))
    return model, path


def test_a_user_model_instance_is_checked_message_by_message(tmp_path):
    model, path = _user_file(tmp_path)
    header_name = "torch.nn.modules.container.Sequential"
    with pytest.raises(CardkitError, match=r"^load_artifact\(model=...\) takes an nn.Module instance, got int$"):
        load_artifact(path, model=3)
    pruned = nn.Sequential(nn.Linear(3, 2))
    add_masks(pruned)
    with pytest.raises(CardkitError, match=r"^the Sequential given to load_artifact is pruned or factorized already; "
                                           r"pass a freshly built instance: load_artifact\(path, model=MyNet\(\)\)$"):
        load_artifact(path, model=pruned)
    with pytest.raises(CardkitError, match=rf"^artifact '{re.escape(str(path))}': 0.weight is \(2, 3\) in the file but "
                                           rf"\(4, 3\) in the given Sequential; the file holds a {header_name}: pass "
                                           rf"a freshly built instance of that architecture$"):
        load_artifact(path, model=nn.Sequential(nn.Linear(3, 4)))
    loaded = load_artifact(path, model=nn.Sequential(nn.Linear(3, 2)))
    x = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_user_record_with_an_edited_fingerprint_is_refused(tmp_path):
    header_name = "torch.nn.modules.container.Sequential"
    _, path = _user_file(tmp_path, lambda h: h["arch"].update(fingerprint="0" * 64))
    with pytest.raises(CardkitError, match=rf"^artifact '{re.escape(str(path))}': the given Sequential has other tensors than the "
                                           rf"exported {header_name} \(their names and shapes differ\); the file "
                                           rf"holds a {header_name}: pass a freshly built instance of that "
                                           rf"architecture$"):
        load_artifact(path, model=nn.Sequential(nn.Linear(3, 2)))
    for bad in ({"fingerprint": "xyz"}, {"fingerprint": 5}, {"name": None}):
        _, path = _user_file(tmp_path, lambda h: h["arch"].update(bad))
        with pytest.raises(CardkitError, match=rf"^artifact '{re.escape(str(path))}': its user architecture record lacks a class "
                                               rf"name or a valid fingerprint; the file is corrupt or was edited$"):
            load_artifact(path, model=nn.Sequential(nn.Linear(3, 2)))


def test_a_structurally_rebuilt_model_round_trips_and_no_tensor_may_outgrow_its_base(tmp_path):
    from cardkit.prune.structured import channel_masks, rebuild

    torch.manual_seed(0)
    dense = create_model("cnn_small", 10, 1, 28)
    smaller = rebuild(dense, channel_masks(dense, 0.5)).eval()  # conv1 keeps 8 of 16 channels
    path = tmp_path / "s.card"
    save_artifact(smaller, path)
    loaded = load_artifact(path)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), smaller(x))
    # The same file with conv1's bias listed at 17 channels, more than the base's 16 (and again
    # with an extra dimension) is refused by the shape check alone.
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"])
    arrays = dict(_load_arrays(data))
    for shape, shown in (([17], r"\(17,\)"), ([8, 1], r"\(8, 1\)")):
        edited = json.loads(json.dumps(header))
        edited["other"] = [[n, shape if n == "conv1.bias" else s] for n, s in edited["other"]]
        if shape == [17]:  # keep the float count consistent: nine more values after conv1.bias
            offset = sum(int(np.prod(s)) for n, s in header["other"][:[n for n, _ in header["other"]].index("conv1.bias") + 1])
            arrays_edit = dict(arrays, other=np.insert(arrays["other"], offset, np.zeros(9, np.float32)))
        else:
            arrays_edit = arrays
        from cardkit.compress.artifact import _digest
        edited["sha256"] = _digest(arrays_edit)
        path.write_bytes(_save_arrays(arrays_edit, metadata={"cardkit": json.dumps(edited)}))
        with pytest.raises(CardkitError, match=rf"^artifact '{re.escape(str(path))}': conv1.bias is {shown} in the "
                                               rf"file but \(16,\) in the cnn_small architecture; the file is "
                                               rf"corrupt or was edited$"):
            load_artifact(path)


def test_binary_codes_of_plus_minus_alpha_values():
    from cardkit.compress.stored import binary_codes

    values = torch.tensor([[0.5, -0.5, 0.0, 0.5]])
    q = binary_codes(values, values != 0)
    # One sign bit each (code 1 is +alpha), alpha = 0.5; the values are kept as given.
    assert q.bits == 1 and q.codebook.tolist() == [[-0.5, 0.5]] and q.codes.tolist() == [[1, 0, 0, 1]]
    assert q.values is values
    assert binary_codes(torch.tensor([[0.5, -0.25]]), torch.tensor([[True, True]])) is None  # two magnitudes
    empty = binary_codes(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))  # nothing kept: alpha 0
    assert empty.codebook.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("rank,r", [(0.5, 1), (1.0, 2)])
def test_atmc_files_of_rank_one_and_of_full_rank_load(tmp_path, rank, r):
    # Linear(3, 2): rank 1 and rank min(2, 3) = 2 are the limits a file may give its factors.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    (layer,) = to_atmc(model, rank=rank, bits=2)
    assert layer.u.shape == (2, r)
    save_artifact(model, tmp_path / "a.card")
    loaded = load_artifact(tmp_path / "a.card", model=nn.Sequential(nn.Linear(3, 2)))
    x = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_header_values_in_messages_are_cut_at_40_characters():
    from cardkit.compress.artifact import _short

    assert _short("a" * 38) == repr("a" * 38)  # 40 characters with the quotes: whole
    assert _short("a" * 39) == "'" + "a" * 36 + "..."  # 41: the first 37, then ...


# --- encode: a decoded tensor checks both the count of weights and the count of kept ones ------

from dataclasses import replace  # noqa: E402

from cardkit.compress.encode import decode_tensor, encode_tensor  # noqa: E402
from cardkit.compress.stored import StoredTensor  # noqa: E402


@pytest.mark.parametrize("field, value", [("kept", 4), ("shape", (2, 5))])
def test_positions_that_disagree_with_either_count_are_refused(field, value):
    """A 2 x 4 float tensor with 3 kept weights: the header may not claim 4 kept of 8 (the weight
    count right) nor 3 kept of 10 (the kept count right)."""
    values = torch.arange(1.0, 9.0).view(2, 4)
    kept = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    encoded = encode_tensor(StoredTensor("w", values, kept, "float", None))
    assert torch.equal(decode_tensor(encoded), torch.tensor([[1.0, 0, 0, 4], [0, 0, 7, 0]]))
    with pytest.raises(ValueError, match="the positions hold 3 kept of 8 weights"):
        decode_tensor(replace(encoded, **{field: value}))
