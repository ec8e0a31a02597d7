import pytest
import torch

from optimum_rom import RomConfig
from optimum_rom.allocation import UnreachableTargetError, plan_by_damage, rank_for_budget
from optimum_rom.calibration.data import CalibrationSet
from optimum_rom.calibration.gradients import OutputGradients, load_covariances
from optimum_rom.calibration.walker import BlockStream, ReadOnlyBlocks, embed_inputs, walk_blocks
from optimum_rom.passes.rom import plan_rom
from optimum_rom.streaming import LazyCheckpoint
from optimum_rom.structure import count_parameters, decoder_linear_parameters, find_blocks, find_linear_sites

from .conftest import ARCHITECTURES, tiny_model, whole_model_output_gradients


def test_rank_formula_is_the_papers():
    # r = int(k * d_in * d_out / (d_in + d_out))
    assert rank_for_budget(0.5, 576, 1536) == int(0.5 * 576 * 1536 / 2112)
    assert rank_for_budget(0.46, 4096, 4096) == 942
    assert rank_for_budget(1e-9, 64, 64) == 1  # never below rank 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("allocation", ["uniform", "paper"])
@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.6])
def test_params_ratio_is_reached_within_one_percent(arch, allocation, ratio):
    model = tiny_model(arch)
    plan = plan_rom(model, RomConfig(params_ratio=ratio, allocation=allocation))
    assert plan.kept_params <= ratio * count_parameters(model)
    assert plan.ratio == pytest.approx(ratio, rel=0.01)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("scoring", ["matrix", "direction"])
def test_adaptive_allocation_measures_the_model_and_reaches_the_target(arch, scoring):
    model = tiny_model(arch)
    input_ids = torch.randint(
        0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0)
    )
    config = RomConfig(params_ratio=0.7, allocation="adaptive", scoring=scoring)
    plan = plan_rom(model, config, CalibrationSet(input_ids), progress=False)
    assert plan.kept_params <= 0.7 * count_parameters(model)
    assert plan.ratio == pytest.approx(0.7, rel=0.01)
    assert len(set(plan.ranks.values())) > 1  # not uniform
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # measuring left no trace


@pytest.mark.parametrize("allocation", ["uniform", "paper"])
def test_a_ratio_of_the_linears_is_reached_the_way_papers_count_it(allocation):
    model = tiny_model("qwen2")  # tied embeddings: a large share of the model is not in the linears
    linears, total = decoder_linear_parameters(model), count_parameters(model)
    plan = plan_rom(model, RomConfig(params_ratio=0.6, ratio_of="linears", allocation=allocation))
    kept_linears = linears - (total - plan.kept_params)
    assert kept_linears <= 0.6 * linears and kept_linears == pytest.approx(0.6 * linears, rel=0.01)
    assert plan.ratio == pytest.approx((total - 0.4 * linears) / total, abs=0.01)  # of the whole model, more
    same_model_ratio = plan_rom(model, RomConfig(params_ratio=plan.ratio + 1e-9, allocation=allocation))
    assert same_model_ratio.ranks == plan.ranks  # one budget, two ways to state it


def test_a_compressed_checkpoint_records_both_accountings(model_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from optimum_rom import LowRankOptimizer

    optimizer = LowRankOptimizer.from_pretrained(model_dir("qwen2"))
    config = RomConfig(params_ratio=0.7, ratio_of="linears", num_samples=4, seq_len=32)
    optimizer.compress(config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False)
    report = optimizer.report
    assert report.linear_ratio == pytest.approx(0.7, abs=0.01) and report.ratio > 0.75
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "rom").config.quantization_config
    assert saved.ratio_of == "linears" and saved.params_ratio == 0.7
    assert saved.kept_ratios == {
        "model": pytest.approx(report.ratio, abs=1e-6),
        "linears": pytest.approx(report.linear_ratio, abs=1e-6),
    }
    card = (tmp_path / "rom" / "README.md").read_text()
    assert f"{report.linear_ratio:.3f} of its decoder linears (target 0.7 of the decoder linears)" in card


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("per_direction", [False, True])
def test_gradients_measured_block_by_block_equal_the_whole_model_backward(
    arch, streamed, per_direction, tmp_path
):
    model = tiny_model(arch)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (20, 32), generator=generator)
    targets = torch.rand(20, 32, generator=generator) > 0.5  # chat data: only some tokens are targets
    targets[8:16] = False  # and one group of sequences has none
    data = CalibrationSet(ids, targets)
    sites = find_linear_sites(model)
    bases = {}  # per direction: the squared gradient along each column of an orthonormal basis
    if per_direction:
        for site in sites[::2]:
            random = torch.randn(site.out_features, min(site.out_features, 6), generator=generator)
            bases[site.name] = torch.linalg.qr(random.double())[0].float()
    expected = whole_model_output_gradients(model, data, sites, bases)
    # what a Fisher-metric factorization weights by: every linear's gradient covariance, kept per block
    covariances = tmp_path / "covariances" if per_direction else None
    if covariances is not None:
        covariances.mkdir()
        expected_covariances = whole_model_output_gradients(model, data, sites, covariances=True)

    weights = None
    if streamed:  # from disk, one block at a time, the model itself on the meta device
        model.save_pretrained(tmp_path / "dense")
        weights = LazyCheckpoint(tmp_path / "dense")
        model = weights.model
    measured = block_by_block_gradients(model, data, tmp_path, bases, covariances, weights)

    assert measured.keys() == expected.keys()
    for name, value in expected.items():
        if name in bases:  # projected in float32, the gradients' precision
            torch.testing.assert_close(
                measured[name], value, rtol=1e-5, atol=1e-7 * value.max().item(), msg=name
            )
        else:
            assert measured[name] == pytest.approx(value, rel=1e-9), name
    assert list(tmp_path.glob(".rom-gradients-*")) == []  # the spilled inputs are gone
    if covariances is not None:
        kept = {}
        for block in range(len(find_blocks(model)[1])):
            kept.update(load_covariances(covariances, block))
        assert kept.keys() == expected_covariances.keys()
        for name, value in expected_covariances.items():  # summed in float32
            torch.testing.assert_close(kept[name], value, rtol=1e-4, atol=1e-6 * value.abs().max().item())


def test_the_gradient_walk_runs_its_blocks_in_the_precision_asked_for(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationSet(ids)
    sites = find_linear_sites(model)
    bases = {  # half the linears measured along the directions of a basis, as per-direction scoring does
        site.name: torch.linalg.qr(
            torch.randn(site.out_features, 6, generator=torch.Generator().manual_seed(1))
        )[0]
        for site in sites[::2]
    }
    exact = block_by_block_gradients(model, data, tmp_path, bases)
    rounded = block_by_block_gradients(model, data, tmp_path, bases, precision="bfloat16")
    for names in (list(bases), [site.name for site in sites if site.name not in bases]):
        # bfloat16 block forwards (and projections, where a basis is given): close, not equal
        pair = [
            torch.cat([torch.as_tensor(m[n], dtype=torch.float64).reshape(-1) for n in names])
            for m in (exact, rounded)
        ]
        torch.testing.assert_close(pair[1], pair[0], rtol=0.02, atol=0.0)
        assert not torch.equal(pair[1], pair[0])


def block_by_block_gradients(
    model, data, scratch, bases=None, covariances=None, weights=None, precision="float32"
):
    """What the gradient walk of adaptive allocation measures: a forward walk recording every block
    (and the bases to measure along), then the backward through the blocks."""
    blocks_name, blocks = find_blocks(model)
    gradients = OutputGradients(model, data, scratch=scratch, covariances=covariances)
    stream = weights and BlockStream(
        ReadOnlyBlocks(weights, blocks_name), 0, embed_inputs(model, data.input_ids, weights)
    )
    with torch.no_grad():
        for step in walk_blocks(model, data.input_ids, progress=False, stream=stream):
            for name, basis in (bases or {}).items():
                if name.startswith(step.name + "."):
                    gradients.keep_basis(step.index, name, basis)
            gradients.record(step, last=step.index == len(blocks) - 1)
    by_block = {}
    for site in find_linear_sites(model):
        by_block.setdefault(site.block, []).append(site.name)
    return gradients.backward(by_block, weights, progress=False, precision=precision)


def test_adaptive_allocation_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration data"):
        plan_rom(tiny_model("llama"), RomConfig(params_ratio=0.7, allocation="adaptive"))


def test_the_budget_goes_where_truncation_hurts_most():
    model = tiny_model("llama")
    sites = [s for s in find_linear_sites(model) if s.name.endswith("q_proj")][:2]
    fixed = count_parameters(model) - sum(s.dense_params for s in sites)
    total = fixed + sum(s.dense_params for s in sites)
    spectrum = torch.linspace(1.0, 0.1, 65, dtype=torch.float64)
    spectrum[-1] = 0
    damage = {sites[0].name: spectrum, sites[1].name: 10 * spectrum}  # the second hurts 10x more
    ratio = (fixed + 0.6 * sum(s.dense_params for s in sites)) / total
    plan = plan_by_damage(sites, total, ratio, True, damage)
    assert plan.ranks.get(sites[1].name, 10**9) > plan.ranks[sites[0].name]
    assert plan.kept_params <= ratio * total


def test_paper_allocation_compresses_only_trailing_blocks():
    model = tiny_model("llama")
    plan = plan_rom(model, RomConfig(params_ratio=0.9, allocation="paper", num_trailing_blocks=2))
    assert plan.blocks == [1, 2]
    assert plan.ranks and all(".layers.0." not in name for name in plan.ranks)


def test_a_layer_is_only_factorized_when_that_saves_parameters():
    model = tiny_model("llama")
    plan = plan_rom(model, RomConfig(params_ratio=1.0))
    assert plan.ranks == {}  # at full budget no factorization is smaller than the dense matrix
    sites = {s.name: s for s in find_linear_sites(model)}
    plan = plan_rom(model, RomConfig(params_ratio=0.85))
    for name, rank in plan.ranks.items():
        site = sites[name]
        assert rank * (site.in_features + site.out_features) + site.out_features < site.dense_params


def test_unreachable_target_fails_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(
        UnreachableTargetError, match=r"params_ratio=0.05 is out of reach.*Choose params_ratio >="
    ):
        plan_rom(model, RomConfig(params_ratio=0.05))
    with pytest.raises(UnreachableTargetError, match="compress more blocks"):
        plan_rom(model, RomConfig(params_ratio=0.5, allocation="paper", num_trailing_blocks=1))
    with pytest.raises(
        UnreachableTargetError, match=r"params_ratio=0.01 of the decoder linears is 0\.\d+ of the whole model"
    ):
        from optimum_rom import LowRankOptimizer, SvdConfig

        LowRankOptimizer(model).compress(SvdConfig(params_ratio=0.01, ratio_of="linears"), progress=False)


def test_config_rejects_nonsense():
    for bad in (0, -0.1, 1.5, "0.8"):
        with pytest.raises(ValueError, match=r"params_ratio must be in \(0, 1\]"):
            RomConfig(params_ratio=bad)
    with pytest.raises(ValueError, match="allocation must be one of"):
        RomConfig(allocation="random")
    with pytest.raises(ValueError, match="ratio_of must be one of"):
        RomConfig(ratio_of="embeddings")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        RomConfig(num_samples=0)


def test_target_modules_select_and_validate():
    model = tiny_model("llama")
    plan = plan_rom(model, RomConfig(params_ratio=0.95, target_modules=["mlp.up_proj", "mlp.gate_proj"]))
    assert plan.ranks and all(name.endswith(("up_proj", "gate_proj")) for name in plan.ranks)
    with pytest.raises(ValueError, match="not an nn.Linear inside the decoder blocks"):
        plan_rom(model, RomConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ValueError, match="matches no module"):
        plan_rom(model, RomConfig(target_modules=["qkv"]))
