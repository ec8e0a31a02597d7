import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig
from optimum_rom.calibration import LinearStatistics, Moments, walk_blocks
from optimum_rom.calibration.data import CalibrationSet
from optimum_rom.calibration.sensitivity import measure_damage
from optimum_rom.calibration.statistics import CrossMoments
from optimum_rom.linalg import fisher_root
from optimum_rom.passes import rom as rom_pass
from optimum_rom.passes.rom import plan_rom, rom_factorize, run_rom
from optimum_rom.refinement import refine_block
from optimum_rom.structure import count_parameters, find_linear_sites
from optimum_rom.training import AdamInBackward, Budget, adam, train

from .conftest import ARCHITECTURES, tiny_model


def features(n=4000, dim=48, seed=0):
    """Correlated features with a large mean, like LLM hidden states."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    return torch.randn(n, dim, generator=generator) @ mixing * 0.3 + 3 * torch.randn(dim, generator=generator)


def input_statistics(x: torch.Tensor) -> LinearStatistics:
    moments = Moments(x.shape[1])
    for chunk in x.split(1000):
        moments.update(chunk)
    return LinearStatistics("input", moments)


@pytest.mark.parametrize("out_features", [32, 96])  # narrow output, and wide output (the gate/up path)
def test_rom_layer_is_the_pca_of_its_outputs(out_features):
    torch.manual_seed(0)
    x, linear, rank = features(), nn.Linear(48, out_features), 12
    outputs = (linear(x) - linear.bias).detach().double()
    mean = outputs.mean(0)
    _, vectors = torch.linalg.eigh((outputs - mean).T @ (outputs - mean))
    basis = vectors[:, -rank:]
    expected = (outputs - mean) @ basis @ basis.T + mean + linear.bias.double()

    layer = rom_factorize(linear, input_statistics(x), rank)
    assert isinstance(layer, FactorizedLinear) and layer.rank == rank
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-4)


# output-side statistics are what a linear narrower than its input gets
@pytest.mark.parametrize(("site", "out_features"), [("input", 32), ("input", 96), ("output", 32)])
def test_output_eigenpairs_diagonalize_the_output_covariance(out_features, site):
    """What direction-level damage scoring projects gradients onto: the principal directions of ``W x``,
    from either kind of statistics, with a dead input channel (a singular input covariance)."""
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, out_features, bias=False)
    x[:, 5] = 1.0  # constant: no variance once centred
    outputs = x.double() @ linear.weight.detach().double().T
    moments = Moments(48 if site == "input" else out_features)
    moments.update(x if site == "input" else outputs)
    values, vectors = LinearStatistics(site, moments).output_eigenpairs(linear.weight.detach(), center=True)

    centred = outputs - outputs.mean(0)
    covariance = centred.T @ centred / len(x)
    expected = torch.linalg.eigvalsh(covariance).flip(0)[: len(values)]
    torch.testing.assert_close(values, expected.clamp(min=0), atol=1e-6 * float(expected[0]), rtol=1e-6)
    live = values > 1e-8 * values[0]
    assert live.sum() == min(out_features, 47)
    torch.testing.assert_close(
        vectors.T @ covariance @ vectors, torch.diag(values), atol=1e-6 * float(values[0]), rtol=0
    )
    torch.testing.assert_close(
        vectors[:, live].T @ vectors[:, live], torch.eye(int(live.sum()), dtype=torch.float64)
    )


def test_full_rank_rom_is_exact_and_the_mean_correction_matters():
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, 32, bias=False)
    stats = input_statistics(x)
    torch.testing.assert_close(rom_factorize(linear, stats, 32)(x), linear(x), atol=1e-4, rtol=1e-4)
    centred = rom_factorize(linear, stats, 4, center=True)
    uncentred = rom_factorize(linear, stats, 4, center=False)
    assert centred.up.bias is not None and uncentred.up.bias is None
    error = {name: (layer(x) - linear(x)).pow(2).mean() for name, layer in [("c", centred), ("u", uncentred)]}
    assert error["c"] < error["u"]


def test_rom_beats_plain_svd_of_the_weight_on_the_calibration_data():
    torch.manual_seed(0)
    x, linear, rank = features(), nn.Linear(48, 40), 8
    rom = rom_factorize(linear, input_statistics(x), rank)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    svd = FactorizedLinear.from_factors(s[:rank, None] * vh[:rank], u[:, :rank], linear.bias.detach())
    rom_error = (rom(x) - linear(x)).pow(2).mean()
    svd_error = (svd(x) - linear(x)).pow(2).mean()
    assert rom_error < 0.5 * svd_error


def gradient_weighted_case(site: str):
    """A linear, its calibration features ``x`` and statistics measured at ``site``, the covariance of
    its outputs, and a loss-gradient covariance at its output whose directions do not line up with
    the features' (a random rotation)."""
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, 32)
    outputs = (linear(x) - linear.bias).detach().double()
    generator = torch.Generator().manual_seed(1)
    mixing = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))[0]
    gradient_covariance = mixing @ torch.diag(torch.logspace(0, -3, 32, dtype=torch.float64)) @ mixing.T
    moments = Moments(48 if site == "input" else 32)
    moments.update(x if site == "input" else outputs)
    centred = outputs - outputs.mean(0)
    return x, linear, LinearStatistics(site, moments), centred.T @ centred / len(x), gradient_covariance


def weighted_error(layer: nn.Module, linear: nn.Linear, x: torch.Tensor, metric: torch.Tensor) -> float:
    """``E[e^T M e]`` of the error ``e`` of ``layer`` against ``linear`` on ``x``."""
    error = (layer(x) - linear(x)).detach().double()
    return torch.einsum("ni,ij,nj->", error, metric, error).item() / len(x)


@pytest.mark.parametrize("site", ["input", "output"])
def test_a_fisher_metric_factorization_minimizes_the_loss_weighted_error(site):
    """With the loss gradients' covariance as the metric, the kept directions are the ones the loss
    feels: the weighted error is the tail of the weighted spectrum, well below what the plain PCA
    leaves, and full damping is the plain PCA."""
    x, linear, stats, output_covariance, gradient_covariance = gradient_weighted_case(site)
    rank, root = 6, fisher_root(gradient_covariance, damping=0.1)
    metric = root @ root.T
    fisher = rom_factorize(linear, stats, rank, root=root)
    plain = rom_factorize(linear, stats, rank)
    weighted_spectrum = torch.linalg.eigvalsh(root.T @ output_covariance @ root).flip(0)
    error = weighted_error(fisher, linear, x, metric)
    assert error == pytest.approx(weighted_spectrum[rank:].sum().item(), rel=1e-3)
    assert error < 0.8 * weighted_error(plain, linear, x, metric)
    undamped = rom_factorize(linear, stats, rank, root=fisher_root(gradient_covariance, damping=1.0))
    torch.testing.assert_close(undamped(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site", ["input", "output"])
def test_a_scored_factorization_keeps_the_principal_directions_the_loss_feels_most(site):
    """Ranked by variance times gradient energy, the kept eigenvectors leave the least
    loss-weighted error any choice of them can (the sum of the dropped scores), below what the
    top-variance choice leaves; with an isotropic gradient it is the plain PCA."""
    x, linear, stats, output_covariance, gradient_covariance = gradient_weighted_case(site)
    rank = 6
    scored = rom_factorize(linear, stats, rank, gradient=gradient_covariance)
    plain = rom_factorize(linear, stats, rank)
    variances, directions = torch.linalg.eigh(output_covariance)
    scores = variances * torch.einsum("ij,ik,kj->j", directions, gradient_covariance, directions)
    error = weighted_error(scored, linear, x, gradient_covariance)
    assert error == pytest.approx(scores.sort().values[: len(scores) - rank].sum().item(), rel=1e-3)
    assert error < 0.95 * weighted_error(plain, linear, x, gradient_covariance)
    isotropic = rom_factorize(linear, stats, rank, gradient=torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(isotropic(x), plain(x), atol=1e-5, rtol=1e-5)


def test_walker_feeds_each_block_the_output_of_the_modified_block_before_it():
    model = tiny_model("llama")
    ids = torch.randint(0, 500, (4, 16))
    seen = []
    for step in walk_blocks(model, ids, progress=False):
        seen.append(step.inputs.clone())
        if step.index == 0:
            expected_next = step.forward() * 0  # what block 1 must see after we silence block 0
            step.block.forward = lambda hidden_states, *args, **kwargs: hidden_states * 0
    torch.testing.assert_close(seen[1], expected_next)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("allocation", ["uniform", "paper"])
def test_compressing_a_model_reaches_the_target_and_keeps_it_working(
    arch, allocation, tokenizer, calibration_file
):
    model = tiny_model(arch)
    dense_params = count_parameters(model)
    ids = torch.randint(0, 500, (2, 24))
    dense_logits = model(ids).logits

    optimizer = LowRankOptimizer(model, tokenizer)
    config = RomConfig(params_ratio=0.8, allocation=allocation, num_samples=16, seq_len=32)
    compressed = optimizer.compress(config, calibration=calibration_file, progress=False)

    assert sum(p.numel() for p in compressed.parameters()) == optimizer.report.params_after  # tied: once
    assert optimizer.report.ratio == pytest.approx(0.8, rel=0.01)
    assert count_parameters(compressed) <= 0.8 * dense_params
    factorized = [m for m in compressed.modules() if isinstance(m, FactorizedLinear)]
    assert len(factorized) == len(compressed.config.quantization_config.modules) > 0
    logits = compressed(ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, dense_logits)


def test_calibration_walks_in_bfloat16_compress_as_float32_does(tokenizer, calibration_file):
    """The walks' block forwards multiply in bfloat16 (their linears read and write bfloat16), and
    the model they make is the float32 one up to a small share of what compression itself changes."""
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    dense_logits = tiny_model("llama")(ids).logits
    logits, seen = {}, set()
    for precision in ("float32", "bfloat16"):
        model = tiny_model("llama")
        hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
            lambda module, inputs, output, precision=precision: seen.add((precision, output.dtype))
        )
        config = RomConfig(params_ratio=0.8, num_samples=16, seq_len=32, calibration_precision=precision)
        compressed = LowRankOptimizer(model, tokenizer).compress(
            config, calibration=calibration_file, progress=False
        )
        hook.remove()
        logits[precision] = compressed(ids).logits
    assert seen == {("float32", torch.float32), ("bfloat16", torch.bfloat16)}
    compression = (logits["float32"] - dense_logits).norm()
    assert (logits["bfloat16"] - logits["float32"]).norm() < 0.1 * compression


def test_damage_measured_in_bfloat16_is_the_float32_damage():
    """Adaptive allocation's measuring walk in bfloat16: every damage curve within a few percent."""
    model = tiny_model("llama")
    data = CalibrationSet(torch.randint(0, 500, (16, 32), generator=torch.Generator().manual_seed(0)))
    sites = find_linear_sites(model)
    damage = {
        p: measure_damage(model, data, sites, progress=False, precision=p) for p in ("float32", "bfloat16")
    }
    for site in sites:
        exact, rounded = damage["float32"][site.name], damage["bfloat16"][site.name]
        torch.testing.assert_close(rounded, exact, rtol=0.05, atol=0.01 * exact[0].item(), msg=site.name)


def paired_statistics(x: torch.Tensor, z: torch.Tensor) -> LinearStatistics:
    moments = CrossMoments(x.shape[1])
    for xs, zs in zip(x.split(1000), z.split(1000), strict=True):
        moments.update_pair(xs, zs)
    return LinearStatistics("paired", moments)


def test_error_correcting_fit_equals_rom_when_nothing_upstream_changed():
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, 40)
    plain = rom_factorize(linear, input_statistics(x), 10)
    corrected = rom_factorize(linear, paired_statistics(x, x), 10, ridge=0.0)
    torch.testing.assert_close(corrected(x), plain(x), atol=1e-4, rtol=1e-4)


def test_error_correcting_fit_undoes_upstream_distortion():
    """The compressed model's inputs x are a distorted version of the dense model's inputs z:
    fitting the dense outputs recovers them, fitting x's own outputs cannot."""
    torch.manual_seed(0)
    z, linear = features(), nn.Linear(48, 40)
    distortion = torch.eye(48) + 0.3 * torch.randn(48, 48)
    x = z @ distortion.T + 0.5
    wanted = linear(z)
    plain = rom_factorize(linear, input_statistics(x), 40)
    corrected = rom_factorize(linear, paired_statistics(x, z), 40, ridge=0.0)
    plain_error = (plain(x) - wanted).pow(2).mean()
    corrected_error = (corrected(x) - wanted).pow(2).mean()
    assert corrected_error < 1e-6 * plain_error


@pytest.mark.parametrize(
    ("schedule", "trained", "precision"),
    [("constant", "factors", "float32"), ("cosine", "block", "float32"), ("constant", "factors", "bfloat16")],
)
def test_block_refinement_reduces_the_block_error(schedule, trained, precision):
    model = tiny_model("llama")
    ids = torch.randint(0, 500, (64, 32), generator=torch.Generator().manual_seed(0))
    step = next(iter(walk_blocks(model, ids, progress=False)))
    targets = step.forward()
    block = step.block
    for name in ("mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj"):  # truncated SVDs: a damaged block
        dense = block.get_submodule(name)
        u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
        layer = FactorizedLinear.from_factors(s[:4, None] * vh[:4], u[:, :4], dense.bias)
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, layer)
    with torch.no_grad():
        block.post_attention_layernorm.weight.mul_(1.5)  # what only training the whole block can undo
    norm, dense = block.post_attention_layernorm.weight.clone(), block.self_attn.v_proj.weight.clone()

    def error() -> float:
        with torch.no_grad():
            return (step.forward() - targets).pow(2).mean().item()

    seen = set()  # what the factors multiply in while the block trains
    hook = block.mlp.gate_proj.down.register_forward_hook(
        lambda module, inputs, output: seen.add(output.dtype) if torch.is_grad_enabled() else None
    )
    before = error()
    refine_block(step, targets, epochs=16, lr=1e-3, schedule=schedule, trained=trained, precision=precision)
    hook.remove()
    assert error() < 0.98 * before
    assert seen == {getattr(torch, precision)}
    assert all(p.dtype == torch.float32 for p in block.parameters())  # mixed precision: float32 weights
    moved = (
        not torch.equal(norm, block.post_attention_layernorm.weight),
        not torch.equal(dense, block.self_attn.v_proj.weight),
    )
    assert moved == ((True, True) if trained == "block" else (False, False))  # the factors alone, or all


def test_refinement_that_only_hurts_leaves_the_block_as_it_was():
    """The held-out check keeps the unrefined parameters (kept in a file meanwhile), bit for bit,
    when every epoch makes the block worse; a transposed (non-contiguous) weight included."""
    model = tiny_model("llama")
    ids = torch.randint(0, 500, (64, 32), generator=torch.Generator().manual_seed(0))
    step = next(iter(walk_blocks(model, ids, progress=False)))
    targets = step.forward()
    dense = step.block.mlp.gate_proj
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    layer = FactorizedLinear.from_factors(s[:4, None] * vh[:4], u[:, :4], dense.bias)
    layer.up.weight = torch.nn.Parameter(layer.up.weight.detach().T.contiguous().T)
    step.block.mlp.gate_proj = layer
    before = {name: p.clone() for name, p in layer.named_parameters()}
    refine_block(step, targets, epochs=3, lr=100.0)
    assert not layer.up.weight.is_contiguous()
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name]), name


def test_adam_in_the_backward_trains_exactly_like_adam_after_it():
    """Refinement's optimizer steps each parameter as soon as its gradient is complete (and frees
    it): the same model, to the bit, as one Adam step over all parameters after the backward; tied
    embeddings (one parameter, two uses) included."""
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(0))

    def trained(in_backward: bool):
        model = tiny_model("llama")
        model.config.tie_word_embeddings = True
        model.tie_weights()
        loss_at = lambda step: model(ids, labels=ids).loss  # noqa: E731
        if in_backward:
            with AdamInBackward(model.parameters(), lr=1e-2) as optimizer:
                return train(optimizer, loss_at, Budget(steps=3)), model
        return train(adam(model.parameters(), lr=1e-2), loss_at, Budget(steps=3)), model

    (losses, after), (in_backward_losses, in_backward) = trained(False), trained(True)
    assert losses == in_backward_losses and losses[-1] < losses[0]
    assert all(torch.equal(p, q) for p, q in zip(after.parameters(), in_backward.parameters(), strict=True))
    assert all(p.grad is None for p in in_backward.parameters())  # every gradient freed once used


@pytest.mark.parametrize("refine_target", ["local", "dense"])
def test_refinement_tunes_each_block_towards_its_target(refine_target, monkeypatch):
    """``local``: the dense block on the inputs the compressed block sees; ``dense`` (anchored): the
    dense model's own hidden states after that block, which later blocks then work to restore."""
    model = tiny_model("llama")
    data = CalibrationSet(torch.randint(0, 500, (16, 32), generator=torch.Generator().manual_seed(0)))
    dense_outputs = []

    def keep(module, args, output):
        dense_outputs.append((output[0] if isinstance(output, tuple) else output).clone())

    hooks = [block.register_forward_hook(keep) for block in model.model.layers]
    with torch.no_grad():
        model(data.input_ids)
    for hook in hooks:
        hook.remove()
    targets = []
    monkeypatch.setattr(
        rom_pass, "refine_block", lambda step, wanted, *args, **kwargs: targets.append(wanted)
    )
    # walks in float32, as the dense forward above (auto is bfloat16 on a CPU with AVX512-BF16)
    config = RomConfig(
        params_ratio=0.6, refine_epochs=1, refine_target=refine_target, calibration_precision="float32"
    )
    run_rom(model, config, data, progress=False)
    assert len(targets) == len(dense_outputs) > 1
    torch.testing.assert_close(targets[0], dense_outputs[0], atol=1e-4, rtol=1e-4)  # nothing upstream yet
    later = [
        torch.allclose(t, d, atol=1e-4, rtol=1e-4)
        for t, d in zip(targets[1:], dense_outputs[1:], strict=True)
    ]
    assert all(later) if refine_target == "dense" else not any(later)


def test_new_options_are_validated():
    with pytest.raises(ValueError, match="target must be one of"):
        RomConfig(target="teacher")
    with pytest.raises(ValueError, match="needs center=True"):
        RomConfig(target="dense", center=False)
    with pytest.raises(ValueError, match="refine_epochs must be a non-negative integer"):
        RomConfig(refine_epochs=-1)
    with pytest.raises(ValueError, match="refine_lr must be a positive number"):
        RomConfig(refine_lr=0)
    with pytest.raises(ValueError, match="refine_schedule must be one of"):
        RomConfig(refine_schedule="linear")
    with pytest.raises(ValueError, match="refine_params must be one of"):
        RomConfig(refine_params="norms")
    with pytest.raises(ValueError, match="refine_target must be one of"):
        RomConfig(refine_target="teacher")
    with pytest.raises(ValueError, match="metric must be one of"):
        RomConfig(metric="hessian")
    with pytest.raises(ValueError, match="--allocation adaptive"):
        RomConfig(metric="fisher")  # the uniform default measures no gradients
    with pytest.raises(ValueError, match="needs target='local'"):
        RomConfig(allocation="adaptive", metric="fisher", target="dense")
    for damping in (0, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"fisher_damping must be a number in \(0, 1\]"):
            RomConfig(allocation="adaptive", metric="fisher", fisher_damping=damping)


@pytest.mark.parametrize(
    "options",
    [
        dict(target="dense"),
        dict(refine_epochs=2),
        dict(target="dense", refine_epochs=1),
        dict(refine_epochs=1, refine_target="dense"),
        dict(allocation="adaptive", target="dense"),
        dict(allocation="adaptive", metric="fisher", refine_epochs=1),
        dict(allocation="adaptive", scoring="direction", metric="scored"),
    ],
)
def test_error_correcting_and_refined_compression_end_to_end(options, model_dir, calibration_file, tmp_path):
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, **options)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("qwen2"))
    model = optimizer.compress(
        config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False
    )
    assert optimizer.report.ratio == pytest.approx(0.7, rel=0.01)
    assert torch.isfinite(model(torch.randint(0, 500, (1, 8))).logits).all()


@pytest.mark.parametrize("fails", [False, True])
def test_an_in_memory_fisher_run_leaves_no_measurement_behind(
    fails, model_dir, calibration_file, tmp_path, monkeypatch
):
    temporary = tmp_path / "tmp"  # where an in-memory run spills its gradient covariances
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    spilled = []
    load_covariances = rom_pass.load_covariances

    def load_then_maybe_fail(directory, block):
        spilled.append(Path(directory))
        if fails:
            raise OSError("disk went away")
        return load_covariances(directory, block)

    monkeypatch.setattr(rom_pass, "load_covariances", load_then_maybe_fail)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    assert optimizer.model is not None  # in memory, not streamed
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, allocation="adaptive", metric="fisher")
    if fails:
        with pytest.raises(OSError, match="disk went away"):
            optimizer.compress(config, calibration=calibration_file, progress=False)
    else:
        optimizer.compress(config, calibration=calibration_file, progress=False)
        assert optimizer.report.ratio == pytest.approx(0.7, rel=0.01)
    assert spilled and spilled[0].is_relative_to(temporary)
    assert list(temporary.iterdir()) == []


def test_a_fisher_plan_whose_measurements_are_gone_is_refused_before_any_block_changes(tmp_path):
    model = tiny_model("llama")
    data = CalibrationSet(
        torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    )
    config = RomConfig(params_ratio=0.7, allocation="adaptive", metric="fisher")
    plan = plan_rom(model, config, data, progress=False, scratch=tmp_path)
    shutil.rmtree(plan.fisher)
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="gradient covariances are gone"):
        run_rom(model, config, data, plan, progress=False)
    assert not any(isinstance(module, FactorizedLinear) for module in model.modules())
    assert all(torch.equal(before[name], weight) for name, weight in model.state_dict().items())
