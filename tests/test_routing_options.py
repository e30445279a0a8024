"""The activation-cost options: ``cost_norm``, ``beta_a_logit`` and the per-layer cost scales."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsnet import CapsNet
from capsnet.checkpoint import CheckpointError, check_architecture
from capsnet.config import ConfigError, config_from_dict
from capsnet.routing import RoutingSettings, child_fold, em_routing, inverse_temperatures


def random_routing_problem(seed: int, n=2, positions=3, types=4, children=6, h=16):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(n, positions, types, children, h, generator=g, dtype=torch.float64)
    act = torch.rand(n, positions, children, generator=g, dtype=torch.float64) * 0.9 + 0.05
    beta_u = torch.randn(types, generator=g, dtype=torch.float64) * 0.5
    beta_a = torch.randn(types, generator=g, dtype=torch.float64) * 0.5
    return [t.requires_grad_() for t in (votes, act, beta_u, beta_a)]


def test_one_iteration_uses_the_scaled_cost_and_the_rescaled_beta_a():
    votes, act, beta_u, beta_a = random_routing_problem(0)
    types, children = votes.shape[2], votes.shape[3]
    settings = RoutingSettings(iterations=1, final_lambda=0.3, cost_norm=50.0, beta_a_logit=True)
    result = em_routing(votes, act, beta_u, beta_a, settings, None, impl="plain")
    # By hand: per-patch normalisation starts every assignment at 1 / types.
    weight = act[:, :, None, :] / types  # (N, L, C, I)
    rsum = weight.sum(-1)
    mu = (weight[..., None] * votes).sum(-2) / rsum[..., None]
    var = (weight[..., None] * (votes - mu[..., None, :]) ** 2).sum(-2) / rsum[..., None] + settings.min_var
    scale = 50.0 * types / children
    cost = ((beta_u[:, None] + 0.5 * torch.log(var)) * (scale * rsum)[..., None]).sum(-1)
    lam = inverse_temperatures(settings)[0]
    # beta_a in units of the (only, so last) iteration's logit: the logit is beta_a - lambda * cost
    want = torch.sigmoid(beta_a - lam * cost)
    torch.testing.assert_close(result.activation, want)
    torch.testing.assert_close(result.pose, mu)


def test_without_the_options_the_cost_is_the_papers():
    votes, act, beta_u, beta_a = random_routing_problem(1)
    paper = em_routing(votes, act, beta_u, beta_a, RoutingSettings(), None, impl="plain")
    unit = em_routing(
        votes,
        act,
        beta_u,
        beta_a,
        RoutingSettings(cost_norm=votes.shape[3] / votes.shape[2]),
        None,
        impl="plain",
    )
    torch.testing.assert_close(paper.activation, unit.activation)
    scaled = em_routing(votes, act, beta_u, beta_a, RoutingSettings(cost_norm=100.0), None, impl="plain")
    assert not torch.allclose(paper.activation, scaled.activation)


def test_beta_a_logit_is_the_paper_beta_a_divided_by_the_last_iterations_lambda():
    votes, act, beta_u, beta_a = random_routing_problem(2)
    settings = RoutingSettings(final_lambda=0.02, beta_a_logit=True)
    # lambda of the last of 3 iterations: 0.02 * (1 - 0.95 ** 3), not final_lambda itself
    last = 0.02 * (1 - 0.95**3)
    assert inverse_temperatures(settings)[-1] == pytest.approx(last)
    logit_units = em_routing(votes, act, beta_u, beta_a, settings, None, impl="fast")
    paper_units = em_routing(votes, act, beta_u, beta_a / last, RoutingSettings(final_lambda=0.02), None)
    torch.testing.assert_close(logit_units.activation, paper_units.activation)
    torch.testing.assert_close(logit_units.pose, paper_units.pose)


@pytest.mark.parametrize("cross_position", [True, False])
def test_fast_equals_plain_with_both_options_in_outputs_and_gradients(cross_position):
    height = width = 5
    kernel, stride, child_types, types = 3, 1, 2, 3
    out = (height - kernel) // stride + 1
    children = kernel * kernel * child_types
    votes, act, beta_u, beta_a = random_routing_problem(
        3, positions=out * out, types=types, children=children
    )
    fold = child_fold(height, width, kernel, stride, child_types, "cpu") if cross_position else None
    settings = RoutingSettings(
        iterations=3, final_lambda=0.05, cost_norm=100.0, beta_a_logit=True, layer_scale=7.0
    )
    inputs = [votes, act, beta_u, beta_a]
    results = {}
    for impl in ("fast", "plain"):
        r = em_routing(votes, act, beta_u, beta_a, settings, fold, impl=impl)
        g = torch.Generator().manual_seed(9)
        total = (r.pose * torch.randn(r.pose.shape, generator=g, dtype=r.pose.dtype)).sum() + (
            r.activation * torch.randn(r.activation.shape, generator=g, dtype=r.activation.dtype)
        ).sum()
        results[impl] = (r.pose, r.activation, *torch.autograd.grad(total, inputs))
    for got, want in zip(results["fast"], results["plain"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_model_passes_the_routing_options_of_its_config_to_every_routing_layer():
    cfg = config_from_dict(
        {"data": {"name": "synthetic"}}, ["routing.cost_norm=100", "routing.beta_a_logit=true"]
    )
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=1, num_classes=10, image_size=28)
    layers = [*model.convcaps, model.classcaps]
    assert all(layer.settings.cost_norm == 100.0 and layer.settings.beta_a_logit for layer in layers)
    keyword = CapsNet.from_preset("small", num_classes=10, image_size=28, cost_norm=100.0, beta_a_logit=True)
    assert [layer.settings for layer in [*keyword.convcaps, keyword.classcaps]] == [
        l.settings for l in layers
    ]
    out = model(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(out.activations).all() and torch.isfinite(out.poses).all()


def test_a_layer_scale_multiplies_the_cost_as_cost_norm_does():
    votes, act, beta_u, beta_a = random_routing_problem(4)
    types, children = votes.shape[2], votes.shape[3]
    for impl in ("plain", "fast"):
        scaled = em_routing(votes, act, beta_u, beta_a, RoutingSettings(layer_scale=40.0), None, impl=impl)
        # cost_norm k scales sum_i R_ij by k * C / I: the same factor 40 with k = 40 I / C
        same = RoutingSettings(cost_norm=40.0 * children / types)
        torch.testing.assert_close(
            scaled.activation, em_routing(votes, act, beta_u, beta_a, same, None, impl=impl).activation
        )
        both = RoutingSettings(cost_norm=2.0 * children / types, layer_scale=20.0)
        torch.testing.assert_close(
            scaled.activation, em_routing(votes, act, beta_u, beta_a, both, None, impl=impl).activation
        )
        paper = em_routing(votes, act, beta_u, beta_a, RoutingSettings(), None, impl=impl)
        assert not torch.allclose(paper.activation, scaled.activation)


def test_the_model_gives_each_routing_layer_its_own_cost_scale():
    model = CapsNet.from_preset(
        "small", num_classes=10, image_size=28, beta_a_logit=True, layer_cost_scales=[100, 20, 1]
    )
    assert [layer.settings.layer_scale for layer in model.routing_layers()] == [100.0, 20.0, 1.0]
    assert all(layer.settings.beta_a_logit for layer in model.routing_layers())
    # the architecture record rebuilds the same model (checkpoints, eval, export)
    again = CapsNet(**model.hparams)
    assert [layer.settings.layer_scale for layer in again.routing_layers()] == [100.0, 20.0, 1.0]
    default = CapsNet.from_preset("small", num_classes=10, image_size=28)
    assert [layer.settings.layer_scale for layer in default.routing_layers()] == [1.0, 1.0, 1.0]
    assert default.hparams["layer_cost_scales"] is None
    # an architecture record written before the option existed has no such key: scales of 1
    old_arch = {k: v for k, v in default.hparams.items() if k != "layer_cost_scales"}
    assert [layer.settings.layer_scale for layer in CapsNet(**old_arch).routing_layers()] == [1.0] * 3
    check_architecture(old_arch, default.hparams, "old.pt")
    with pytest.raises(CheckpointError, match=r"routing\.layer_cost_scales: None in the checkpoint"):
        check_architecture(old_arch, model.hparams, "old.pt")
    with pytest.raises(ValueError, match="one factor per routing layer"):
        CapsNet.from_preset("small", num_classes=10, image_size=28, layer_cost_scales=[100, 1])


def test_the_config_takes_one_positive_cost_scale_per_routing_layer():
    base = {"model": {"preset": "small", "iterations": 2}, "data": {"name": "synthetic"}}
    cfg = config_from_dict(base, ["routing.layer_cost_scales=[100, 20, 1]"])
    assert cfg.routing.layer_cost_scales == [100.0, 20.0, 1.0]
    model = CapsNet.from_config(cfg.model, cfg.routing, 1, 10, 28)
    assert [layer.settings.layer_scale for layer in model.routing_layers()] == [100.0, 20.0, 1.0]
    with pytest.raises(ConfigError, match=r"routing\.layer_cost_scales: needs one factor per routing layer"):
        config_from_dict(base, ["routing.layer_cost_scales=[100, 1]"])
    with pytest.raises(ConfigError, match=r"routing\.layer_cost_scales: every entry must be positive"):
        config_from_dict(base, ["routing.layer_cost_scales=[100, 0, 1]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.nan", r"optim\.lr: must be a finite number, got nan"),
        ("routing.min_var=.inf", r"routing\.min_var: must be a finite number, got inf"),
        # as Python writes them, which YAML reads as text
        ("optim.lr=nan", r"optim\.lr: must be a finite number, got nan"),
        ("optim.lr=-Infinity", r"optim\.lr: must be a finite number, got -inf"),
        ("routing.layer_cost_scales=[1, inf]", r"every entry must be a finite number, got \[1\.0, inf\]"),
        ("routing.lambda_decay=1", r"routing\.lambda_decay: must be in \[0, 1\)"),
        ("routing.lambda_decay=-0.5", r"routing\.lambda_decay: must be in \[0, 1\)"),
        ("model.pose_size=1", r"model\.pose_size: coordinate addition writes into two pose entries"),
    ],
)
def test_values_that_would_break_routing_are_config_errors(override, message):
    base = {"model": {"preset": "small"}, "data": {"name": "synthetic"}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(base, [override])


def test_a_one_by_one_pose_without_coordinate_addition_and_lambda_decay_0_are_accepted():
    base = {"model": {"preset": "small"}, "data": {"name": "synthetic"}}
    cfg = config_from_dict(base, ["model.pose_size=1", "model.coord_add=false", "routing.lambda_decay=0"])
    assert cfg.model.pose_size == 1 and cfg.routing.lambda_decay == 0
    lambdas = inverse_temperatures(RoutingSettings(iterations=3, final_lambda=0.01, lambda_decay=0.0))
    assert lambdas == pytest.approx([0.01, 0.01, 0.01])  # every iteration at the final temperature


def test_string_settings_take_names_yaml_would_read_as_a_date_or_a_number():
    base = {"data": {"name": "synthetic"}}
    cfg = config_from_dict(base, ["data.root=2024-05-01", "logging.tb_dir=2024"])
    assert (cfg.data.root, cfg.logging.tb_dir) == ("2024-05-01", "2024")
    with pytest.raises(ConfigError, match="data.root: expected a string, got True"):
        config_from_dict(base, ["data.root=true"])


def test_string_settings_keep_their_text_as_written_on_the_command_line_and_in_a_file(tmp_path):
    from capsnet.config import load_config

    base = {"data": {"name": "synthetic"}}
    cfg = config_from_dict(base, ["logging.out_dir=1_000", "logging.tb_dir=0755", "data.root=/d/run #1"])
    assert (cfg.logging.out_dir, cfg.logging.tb_dir, cfg.data.root) == ("1_000", "0755", "/d/run #1")
    assert config_from_dict(base, ["data.root='a #b'"]).data.root == "a #b"  # quoted: YAML's reading
    assert config_from_dict(base, ["data.root=!!str 5"]).data.root == "5"  # a tag: YAML's reading
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: synthetic\n  root: 012\nlogging:\n  tb_dir: 1:30\n  out_dir: 2.50\n")
    cfg = load_config(path, ["train.epochs=0x10", "optim.lr=1e-3"])
    assert (cfg.data.root, cfg.logging.tb_dir, cfg.logging.out_dir) == ("012", "1:30", "2.50")
    # numbers stay plain numbers (a checkpoint's config is read back with weights_only)
    assert type(cfg.train.epochs) is int and cfg.train.epochs == 16 and type(cfg.optim.lr) is float


def test_integers_that_yaml_1_1_reads_as_octal_or_base_60_are_refused_not_misread(tmp_path):
    from capsnet.config import load_config

    base = {"data": {"name": "synthetic"}}
    for override, text, read in (("train.epochs=010", "010", 8), ("logging.save_every=1:30", "1:30", 90)):
        with pytest.raises(ConfigError) as caught:
            config_from_dict(base, [override])
        key = override.split("=")[0]
        assert caught.value.problems == [
            (
                f"{key}: {text} is read as {read} (YAML 1.1 reads a leading 0 as octal and a colon as "
                "base 60); write the number without them"
            )
        ]
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: synthetic\ntrain:\n  seed: 0755\n")
    with pytest.raises(ConfigError, match=r"train\.seed: 0755 is read as 493"):
        load_config(path)
    # what reads as it looks stays: 0, 10, 1_000, a hex number written as one, a negative number
    cfg = config_from_dict(
        base, ["train.seed=0", "train.epochs=10", "train.max_steps=1_000", "optim.warmup_steps=0x10"]
    )
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.max_steps, cfg.optim.warmup_steps) == (
        0,
        10,
        1000,
        16,
    )


def test_a_staircase_over_the_whole_run_is_refused_it_would_never_decay():
    base = {"data": {"name": "synthetic"}}
    with pytest.raises(ConfigError, match=r"optim\.staircase: with optim\.decay_steps null .* never decay"):
        config_from_dict(base, ["optim.staircase=true", "optim.decay_steps=null"])
    assert config_from_dict(base, ["optim.staircase=true", "optim.decay_steps=100"]).optim.staircase


def test_the_overrides_of_a_stored_configuration_are_checked_as_a_new_config_s_are(tmp_path):
    """A run's saved configuration may hold what earlier versions accepted; what a command adds to
    it with -o (a resume, an evaluation) is checked in full."""
    from capsnet.config import stored_config

    saved = {"data": {"name": "synthetic", "grayscale": True}, "train": {"threads": 5000}}  # an older run's
    assert stored_config(saved, tmp_path / "a.pt").data.grayscale  # read as it was saved
    assert stored_config(saved, tmp_path / "a.pt", ["train.epochs=3"]).train.epochs == 3
    for override, message in (
        ("data.bad_files=fail", r"data\.bad_files: only used by data\.name 'folder'"),
        ("train.threads=2000", r"train\.threads: at most 1,024"),
        ("train.batch_size=3000000000", r"train\.batch_size: at most 2,147,483,647"),
        ("train.compile=true", r"train\.compile: torch\.compile of the whole model fails"),
        ("train={compile: true}", r"train\.compile: torch\.compile of the whole model fails"),
    ):
        with pytest.raises(ConfigError, match=message):
            stored_config(saved, tmp_path / "a.pt", [override])


def test_path_settings_expand_the_home_folder():
    cfg = config_from_dict({"data": {"name": "synthetic"}}, ["logging.out_dir=~/w", "logging.tb_dir=~/tb"])
    assert cfg.logging.out_dir == str(Path.home() / "w") and cfg.logging.tb_dir == str(Path.home() / "tb")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=1733400000000", r"train\.seed: at most 4,294,967,295 \(got 1,733,400,000,000\)"),
        ("train.threads=99999999999", r"train\.threads: at most 1,024 \(got 99,999,999,999\)"),
        ("train.num_workers=99999999999", r"train\.num_workers: at most 2,147,483,647"),
        ("model.iterations=1000", r"model\.iterations: at most 100 \(got 1,000\)"),
        ("model.caps_types=[4, 99999999999]", r"model\.caps_types: at most 2,147,483,647"),
        (
            "routing.layer_cost_scales=[1, 1, .inf]",
            r"routing\.layer_cost_scales: every entry must be a finite",
        ),
        ("train.epochs=", r"override 'train\.epochs=': empty value \(give one, or null for none\)"),
    ],
)
def test_integers_beyond_what_torch_takes_and_infinite_list_entries_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"name": "synthetic"}}, [override])


def test_a_mapping_given_for_a_section_sets_its_keys_and_a_scalar_section_is_named_as_the_configs():
    base = {"data": {"name": "synthetic", "num_classes": 3}, "train": 5}
    with pytest.raises(
        ConfigError, match="train.max_steps: cannot be set: train is 5 in the config, not a section"
    ):
        config_from_dict(base, ["train.max_steps=2"])
    cfg = config_from_dict({"data": {"name": "synthetic", "num_classes": 3}}, ["data={channels: 2}"])
    assert (cfg.data.name, cfg.data.num_classes, cfg.data.channels) == ("synthetic", 3, 2)


def test_compiling_the_whole_model_is_refused_with_the_reconstruction_decoder():
    base = {"data": {"name": "synthetic"}}
    with pytest.raises(
        ConfigError, match="train.compile: torch.compile of the whole model fails in its backward"
    ):
        config_from_dict(base, ["train.compile=true"])
    assert config_from_dict(base, ["train.compile=true", "model.decoder=false"]).train.compile
    assert config_from_dict(base, ["train.compile=true", "loss.recon_weight=0"]).train.compile


def test_a_runs_stored_configuration_keeps_working_where_newer_checks_would_refuse_it():
    from capsnet.config import stored_config

    saved = config_from_dict({"data": {"name": "synthetic"}}).to_dict()
    saved["data"]["grayscale"] = True  # earlier versions accepted a folder key for other datasets
    saved["model"]["decoder"], saved["train"]["compile"] = True, True
    saved["model"]["caps_types"] = [4, 2**31]  # a size torch would refuse, accepted then
    with pytest.raises(ConfigError) as fresh:
        config_from_dict(saved)
    assert len(fresh.value.problems) == 3, fresh.value.problems
    cfg = stored_config(saved, "old.pt", ["data.root=elsewhere"])
    assert cfg.data.grayscale and cfg.data.root == "elsewhere"
    # counters that torch never sees have no limit, fresh or stored
    assert config_from_dict({}, ["logging.hist_every=10000000000"]).logging.hist_every == 10**10
