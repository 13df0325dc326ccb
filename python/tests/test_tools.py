"""Tests of tch-mix-tools against the installed swak: ``python -m pytest python/tests``."""
import copy
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

import tch_mix_tools
from tch_mix_tools import fixtures

BIN = pathlib.Path(sys.executable).parent


def read(path):
    with safe_open(str(path), "pt") as file:
        return load_file(str(path)), file.metadata()


def test_a_float32_fixture_carries_swaks_float64_truth(tmp_path):
    torch.manual_seed(1)
    mix = fixtures.nonzero_biases(SelfAttentionMixer(8, 2))
    inp = torch.randn(5, 3, 8)
    mask = torch.tensor([[False, True, False]] * 5)
    tch_mix_tools.export_fixture(mix, inp, tmp_path / "f.safetensors", mask=mask)
    tensors, meta = read(tmp_path / "f.safetensors")
    assert meta["format"] == tch_mix_tools.FORMAT == "tch-mix-fixture/2"
    assert meta["truth"] == "float64" and meta["dtype"] == "float32"
    results = ["output", "importance", "grad.input"] + [f"grad.state.{k}" for k, _ in mix.named_parameters()]
    for name in results:
        assert tensors[f"truth.{name}"].dtype == torch.float64, name
        assert tensors[f"truth.{name}"].shape == tensors[name].shape, name
    # The truth is swak's own float64 computation from the stored numbers.
    exact = copy.deepcopy(mix).double().eval()
    x = tensors["input"].double().requires_grad_(True)
    out = exact(x, mask)
    (out * tensors["cotangent"].double()).sum().backward()
    assert torch.equal(tensors["truth.output"], out.detach())
    assert torch.equal(tensors["truth.grad.input"], x.grad)
    # ... and differs from the float32 result by rounding only.
    assert 0 < (tensors["output"].double() - out).abs().max() < 1e-5


def test_swaks_error_is_measured_on_neighbouring_problems(tmp_path):
    torch.manual_seed(2)
    mix = fixtures.nonzero_biases(InstanceWeightsMixer(8, 4))
    inp = torch.randn(6, 4, 8)
    tch_mix_tools.export_fixture(mix, inp, tmp_path / "f.safetensors", neighbours=3)
    tensors, meta = read(tmp_path / "f.safetensors")
    assert meta["neighbours"] == "3"
    results = ["output", "importance", "grad.input"] + [f"grad.state.{k}" for k, _ in mix.named_parameters()]
    for name in results:
        error = tensors[f"swak_error.{name}"]
        assert error.dtype == torch.float64 and error.dim() == 0, name
        # Rounding errors of float32, not zero and not more.
        assert 0 < error.item() < 1e-4, (name, error.item())
    # The same draw for the same seed.
    tch_mix_tools.export_fixture(mix, inp, tmp_path / "g.safetensors", neighbours=3)
    again, _ = read(tmp_path / "g.safetensors")
    assert all(torch.equal(tensors[k], again[k]) for k in tensors if k.startswith("swak_error."))


def test_a_neighbour_moves_every_finite_nonzero_number_by_one_unit():
    from tch_mix_tools.fixture import nudged
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        values = [1.0, -3.5, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-3, -7.0, 1e-30, big, -big]
        t = torch.tensor(values * 8, dtype=dtype)
        moved = nudged(t, torch.Generator().manual_seed(0))
        ups = 0
        for before, after in zip(t.tolist(), moved.tolist()):
            if before == 0 or before != before or abs(before) == float("inf"):
                assert after == before or (before != before and after != after), (dtype, before, after)
                continue
            if abs(before) == big and after == before:
                continue  # one unit up would be infinite
            assert after != before and (after > 0) == (before > 0), (dtype, before, after)
            # Adjacent: nothing of the dtype lies between (the midpoint rounds to one of them).
            middle = torch.tensor((before + after) / 2, dtype=torch.float64).to(dtype).item()
            assert middle in (before, after), (dtype, before, after)
            ups += abs(after) > abs(before)
        assert 0 < ups < 8 * 8, (dtype, ups)  # up and down both drawn


def test_a_float64_fixture_has_no_truth(tmp_path):
    mix = GlobalWeightsMixer(4, 3, dtype=torch.float64)
    tch_mix_tools.export_fixture(mix, torch.randn(2, 3, 4), tmp_path / "f.safetensors")
    tensors, meta = read(tmp_path / "f.safetensors")
    assert "truth" not in meta
    assert not any(name.startswith("truth.") for name in tensors)


def test_ignore_masks_are_written_and_checked(tmp_path):
    mix = InstanceWeightsMixer(4, 3)
    inp = torch.randn(2, 3, 4)
    ignore = torch.zeros(2, 4, dtype=torch.bool)
    ignore[1] = True
    tch_mix_tools.export_fixture(mix, inp, tmp_path / "f.safetensors", ignore={"output": ignore})
    tensors, _ = read(tmp_path / "f.safetensors")
    assert torch.equal(tensors["ignore.output"], ignore)
    with pytest.raises(ValueError, match="expected a bool tensor of shape"):
        tch_mix_tools.export_fixture(mix, inp, tmp_path / "g.safetensors", ignore={"output": ignore[0]})
    with pytest.raises(ValueError, match="not a result"):
        tch_mix_tools.export_fixture(mix, inp, tmp_path / "g.safetensors", ignore={"outputs": ignore})


def test_the_huge_pattern_leaves_out_only_the_order_dependent_gradients(tmp_path):
    fixtures.write_nonfinite(tmp_path, seed=3)
    tensors, meta = read(tmp_path / "nonfinite-self-float64-huge.safetensors")
    assert "order of sums" in meta["ignore_reason"]
    assert tensors["ignore.grad.input"][fixtures.HUGE_ROW].all()
    assert not tensors["ignore.grad.input"][: fixtures.HUGE_ROW].any()
    assert tensors["ignore.grad.state.attention.in_proj_weight"].all()
    assert "ignore.output" not in tensors and "ignore.importance" not in tensors
    tensors, _ = read(tmp_path / "nonfinite-instance-float32-huge.safetensors")
    assert not any(name.startswith("ignore.") for name in tensors)


def test_the_dead_query_pattern_leaves_a_query_nothing_but_minus_inf_scores():
    for seed in range(20):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(seed)
            mix = fixtures.nonfinite_mixer("self", dtype)
            inp, _ = fixtures.nonfinite_case("deadquery", dtype, torch.Generator().manual_seed(seed))
            fixtures.dead_query(mix, inp)
            d, hd = fixtures.NF_MOD_DIM, fixtures.NF_MOD_DIM // fixtures.NF_HEADS
            qkv = inp[0] @ mix.attention.in_proj_weight.T + mix.attention.in_proj_bias
            q, k = qkv[:, :hd], qkv[:, d:d + hd]
            scores = q @ k.T  # (query, key), head 0
            assert bool(scores[1].isneginf().all()), (seed, dtype, scores)
            others = scores[[0, 2, 3]]
            assert bool(others[:, 1].isneginf().all() and others[:, [0, 2, 3]].isfinite().all()), (seed, dtype, scores)


def test_generators_are_deterministic_per_seed(tmp_path):
    for seed, folder in [(5, "a"), (5, "b"), (6, "c")]:
        fixtures.write_scale(tmp_path / folder, seed, scales=(3,), small=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 4
    for name in names:
        a, b, c = (read(tmp_path / f / name)[0] for f in "abc")
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not torch.equal(a["input"], c["input"]), name


def test_save_and_metadata_round_trip(tmp_path):
    model = torch.nn.Module()
    model.mix = CrossAttentionMixer(8, n_heads=2)
    model.head = torch.nn.Linear(8, 1)
    meta = tch_mix_tools.metadata(model)
    assert meta["tch_mix.mix.mixer"] == "cross" and meta["tch_mix.mix.n_heads"] == "2"
    for name in ["m.safetensors", "m.pt"]:
        tch_mix_tools.save(model, tmp_path / name)
        assert tch_mix_tools.read_metadata(tmp_path / name) == meta
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    tch_mix_tools.add_metadata(tmp_path / "plain.pt", model)
    assert tch_mix_tools.read_metadata(tmp_path / "plain.pt") == meta
    with pytest.raises(ValueError, match="already holds"):
        tch_mix_tools.add_metadata(tmp_path / "plain.pt", model)
    assert zipfile.is_zipfile(tmp_path / "plain.pt")


def test_console_entry_points_run(tmp_path):
    for command in ["tch-mix-export-fixture", "tch-mix-save", "tch-mix-gen-fixtures",
                    "tch-mix-gen-nonfinite-fixtures", "tch-mix-gen-scale-fixtures"]:
        done = subprocess.run([BIN / command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage" in done.stdout, (command, done.stderr)
    done = subprocess.run([BIN / "tch-mix-gen-scale-fixtures", "--out", tmp_path, "--seed", "4",
                           "--scales", "10", "--small"], capture_output=True, text=True, check=True)
    assert "seed 4" in done.stdout
    assert len(list(tmp_path.glob("scale-*-x10-masked.safetensors"))) == 4
    torch.save(torch.randn(3, 2, 4), tmp_path / "batch.pt")
    mix = SelfAttentionMixer(4, 2, bias=False)
    torch.save({"mix." + k: v for k, v in mix.state_dict().items()}, tmp_path / "model.pt")
    subprocess.run([BIN / "tch-mix-export-fixture", "--mixer", "self", "--mod-dim", "4", "--n-heads", "2",
                    "--no-bias", "--weights", tmp_path / "model.pt", "--prefix", "mix",
                    "--input", tmp_path / "batch.pt", "--out", tmp_path / "f.safetensors"], check=True)
    tensors, meta = read(tmp_path / "f.safetensors")
    assert torch.equal(tensors["state.attention.in_proj_weight"], mix.attention.in_proj_weight.detach())
    assert meta["mixer"] == "self" and meta["bias"] == "false"
