"""Knowledge distillation (loss.teacher): the loss term, its wiring into training, and refusals."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import logged, tiny

from capsnet import trainer
from capsnet.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
from capsnet.config import ConfigError, load_config
from capsnet.data import ImageDataset, PixelTransform
from capsnet.loss import class_scores, compute_loss, distillation_loss
from capsnet.model import CapsOutput
from capsnet.runs import config_for_resume
from capsnet.trainer import fit


def quiet(_msg: str) -> None:
    pass


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# --------------------------------------------------------------------------- the loss term


def test_distillation_loss_is_the_temperature_scaled_kl_divergence_from_the_teachers_distribution():
    torch.manual_seed(0)
    student = torch.rand(5, 4) * 0.98 + 0.01
    teacher = torch.rand(5, 4) * 0.98 + 0.01
    t = 3.0
    p = torch.softmax(class_scores(teacher) / t, dim=1)
    q = torch.softmax(class_scores(student) / t, dim=1)
    by_hand = (p * (p.log() - q.log())).sum(dim=1).mean() * t * t
    got = distillation_loss(student, teacher, t)
    torch.testing.assert_close(got, by_hand)
    assert got > 0
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_gradient_pulls_the_students_scores_towards_the_teachers():
    torch.manual_seed(1)
    scores = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher_scores = torch.randn(6, 5, dtype=torch.float64)
    teacher = torch.sigmoid(teacher_scores).requires_grad_(True)
    t = 2.0
    distillation_loss(torch.sigmoid(scores), teacher, t).backward()
    p_student = torch.softmax(scores.detach() / t, dim=1)
    p_teacher = torch.softmax(teacher_scores / t, dim=1)
    # d/ds of T^2 KL(p_t || softmax(s / T)) = T (softmax(s / T) - p_t), averaged over the batch
    torch.testing.assert_close(scores.grad, t * (p_student - p_teacher) / 6)
    assert teacher.grad is None  # the teacher's side passes no gradient


def test_compute_loss_adds_the_weighted_distillation_term_and_reports_it(tmp_path):
    cfg = tiny(tmp_path, "loss.recon_weight=0", "loss.teacher_weight=0.25", "loss.teacher_temperature=2")
    torch.manual_seed(2)
    acts, taught = torch.rand(4, 4) * 0.9 + 0.05, torch.rand(4, 4) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 3])
    out = CapsOutput(activations=acts, poses=torch.zeros(4, 4, 16))
    x = torch.zeros(4, 1, 20, 20)
    model = SimpleNamespace(decoder=None)
    plain, parts = compute_loss(out, x, y, model, cfg, 0, 10)
    assert "distill" not in parts
    both, parts = compute_loss(out, x, y, model, cfg, 0, 10, teacher_activations=taught)
    kd = distillation_loss(acts, taught, 2.0)
    torch.testing.assert_close(parts["distill"], kd)
    torch.testing.assert_close(both, plain + 0.25 * kd)


# --------------------------------------------------------------------------- training with a teacher


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return fit(tiny(tmp, "train.epochs=1"), run_name="teacher", echo=quiet)


def test_a_teacher_of_weight_zero_changes_nothing_and_a_weighted_one_changes_the_training(
    tmp_path, teacher_run
):
    teacher = teacher_run.run_dir / "best.pt"
    before = {k: v.clone() for k, v in weights(teacher).items()}
    common = ("train.max_steps=3",)
    plain = fit(tiny(tmp_path, *common), run_name="plain", echo=quiet)
    unweighted = fit(
        tiny(tmp_path, *common, f"loss.teacher={teacher}", "loss.teacher_weight=0"),
        run_name="zero",
        echo=quiet,
    )
    lines: list[str] = []
    taught = fit(tiny(tmp_path, *common, f"loss.teacher={teacher}"), run_name="taught", echo=lines.append)
    a, b, c = (weights(r.run_dir / "last.pt") for r in (plain, unweighted, taught))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the teacher's forward draws no random numbers
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # best.pt is named by the file its step wrote beside it, which the teacher run's next best leaves alone
    pinned = teacher.with_name(f"step-{load_checkpoint(teacher)['step']:06d}.pt")
    assert any(line.startswith(f"distilling from {pinned}") and "temperature 4" in line for line in lines)
    after = weights(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher's file is untouched


def test_a_teacher_of_weight_zero_leaves_randomly_augmented_training_as_it_was(
    tmp_path, teacher_run, monkeypatch
):
    real = trainer.build_loaders

    def shifting(*args, **kwargs):  # random shifts and flips, drawn from the run's random stream
        loaders = real(*args, **kwargs)
        info = loaders.info
        loaders.train.dataset.transform = PixelTransform(info.mean, info.std, padding=2, flip=True)
        return loaders

    monkeypatch.setattr(trainer, "build_loaders", shifting)
    common = ("train.max_steps=3",)
    plain = fit(tiny(tmp_path, *common), run_name="plain", echo=quiet)
    teacher = f"loss.teacher={teacher_run.run_dir / 'best.pt'}"
    zero = fit(tiny(tmp_path, *common, teacher, "loss.teacher_weight=0"), run_name="zero", echo=quiet)
    a, b = weights(plain.run_dir / "last.pt"), weights(zero.run_dir / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # neither loading the teacher nor its forward draws


def teacher_per_batch(monkeypatch) -> None:
    """Makes training's items look augmented, so that the teacher runs on every batch."""
    real = trainer.build_loaders

    def augmenting(*args, **kwargs):
        loaders = real(*args, **kwargs)
        train = loaders.train.dataset
        train.eval_transform = copy.copy(train.transform)  # the same pixels, but not known to be
        return loaders

    monkeypatch.setattr(trainer, "build_loaders", augmenting)


@pytest.fixture(params=["ahead", "per batch"])
def teacher_pass(request, monkeypatch):
    """How the teacher's activations are had: "ahead", in a table (the training items never change
    here), or "per batch", the teacher run on every batch, as for augmented training data."""
    if request.param == "per batch":
        teacher_per_batch(monkeypatch)
    return request.param


def test_the_teachers_activations_are_computed_ahead_only_for_training_items_that_never_change(
    tmp_path, teacher_run, teacher_pass
):
    lines: list[str] = []
    teacher = f"loss.teacher={teacher_run.run_dir / 'best.pt'}"
    fit(tiny(tmp_path, "train.max_steps=1", teacher), run_name="x", echo=lines.append)
    ahead = [
        line for line in lines if line.startswith("teacher's class activations of the 96 training images")
    ]
    assert len(ahead) == (1 if teacher_pass == "ahead" else 0), lines


def test_both_ways_of_having_the_teachers_activations_train_alike(tmp_path, teacher_run, monkeypatch):
    teacher = f"loss.teacher={teacher_run.run_dir / 'best.pt'}"
    ahead = fit(tiny(tmp_path, "train.max_steps=8", teacher), run_name="ahead", echo=quiet)
    teacher_per_batch(monkeypatch)
    per_batch = fit(tiny(tmp_path, "train.max_steps=8", teacher), run_name="per-batch", echo=quiet)
    a, b = weights(ahead.run_dir / "last.pt"), weights(per_batch.run_dir / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_the_loss_sees_the_teachers_activations_on_the_very_batch_the_model_trains_on(
    tmp_path, teacher_run, monkeypatch, teacher_pass
):
    teacher_path = teacher_run.run_dir / "best.pt"
    teacher = build_model_from_checkpoint(load_checkpoint(teacher_path)).eval()
    seen = []
    original = trainer.compute_loss

    def spy(out, x, y, *args, teacher_activations=None, **kwargs):
        seen.append((x.clone(), teacher_activations))
        return original(out, x, y, *args, teacher_activations=teacher_activations, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", spy)
    cfg = tiny(
        tmp_path, "train.epochs=3", "train.max_steps=8", "train.accumulate=2", f"loss.teacher={teacher_path}"
    )
    fit(cfg, run_name="spied", echo=quiet)  # 2 epochs of 3 steps and 2 steps more, of 2 batches each
    assert len(seen) == 16
    for x, taught in seen:
        assert taught is not None and not taught.requires_grad
        with torch.no_grad():
            want = teacher(x).activations
        torch.testing.assert_close(taught, want)
        assert not torch.allclose(taught, torch.full_like(taught, taught.mean()))  # not a constant


def test_the_logged_training_loss_is_the_weighted_sum_of_its_logged_parts(
    tmp_path, teacher_run, teacher_pass
):
    teacher = f"loss.teacher={teacher_run.run_dir / 'best.pt'}"
    weighted = ("loss.teacher_weight=0.5", "loss.recon_weight=0.01", "train.max_steps=6")
    taught = fit(tiny(tmp_path, teacher, *weighted), run_name="taught", echo=quiet)
    rows = [r for r in logged(taught.run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["train/loss_recon"] > 0 and r["train/loss_distill"] > 0
        parts = r["train/loss_class"] + 0.01 * r["train/loss_recon"] + 0.5 * r["train/loss_distill"]
        assert r["train/loss"] == pytest.approx(parts, rel=1e-5)
    # two micro-batches a step, each weighed by its images; no teacher, no reconstruction: no such parts
    plain = ("loss.recon_weight=0", "train.batch_size=10", "train.accumulate=2", "train.max_steps=6")
    alone = fit(tiny(tmp_path, *plain), run_name="alone", echo=quiet)
    rows = [r for r in logged(alone.run_dir) if "train/loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert "train/loss_recon" not in r and "train/loss_distill" not in r
        assert r["train/loss_class"] == pytest.approx(r["train/loss"], rel=1e-6)


def test_a_teacher_can_be_named_as_a_run_under_the_output_folder(tmp_path, teacher_run):
    shutil.copytree(teacher_run.run_dir, tmp_path / "weights" / "mentor")
    lines: list[str] = []
    fit(tiny(tmp_path, "train.max_steps=1", "loss.teacher=mentor"), run_name="pupil", echo=lines.append)
    assert any(str(tmp_path / "weights" / "mentor") in line and "distilling" in line for line in lines)


def test_a_resumed_distilled_run_is_bit_identical_to_a_straight_one(tmp_path, teacher_run, teacher_pass):
    taught = f"loss.teacher={teacher_run.run_dir / 'best.pt'}"
    straight = fit(tiny(tmp_path, taught, "train.max_steps=8"), run_name="straight", echo=quiet)
    fit(tiny(tmp_path, taught, "train.max_steps=5"), run_name="split", echo=quiet)
    resumed = fit(tiny(tmp_path, taught, "train.max_steps=8"), resume="latest", echo=quiet)
    a, b = weights(straight.run_dir / "last.pt"), weights(resumed.run_dir / "last.pt")
    assert resumed.step == 8 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_taught_by_latest_resumes_with_the_same_teacher_not_its_own_checkpoint(tmp_path, teacher_run):
    shutil.copytree(teacher_run.run_dir, tmp_path / "weights" / "mentor")
    lines: list[str] = []
    fit(tiny(tmp_path, "loss.teacher=latest", "train.max_steps=5"), run_name="split", echo=lines.append)
    pinned = load_checkpoint(tmp_path / "weights" / "split" / "last.pt")["config"]["loss"]["teacher"]
    assert pinned.startswith(str(tmp_path / "weights" / "mentor" / "step-"))  # the file "latest" was
    straight = fit(
        tiny(tmp_path, f"loss.teacher={pinned}", "train.max_steps=8"), run_name="straight", echo=quiet
    )
    out_dir = f"logging.out_dir={tmp_path / 'weights'}"
    cfg = config_for_resume("latest", [out_dir, "train.max_steps=8"], run_name="split")
    lines.clear()
    resumed = fit(cfg, run_name="split", resume="latest", echo=lines.append)
    assert any(line.startswith(f"distilling from {pinned}") for line in lines), lines
    a, b = weights(straight.run_dir / "last.pt"), weights(resumed.run_dir / "last.pt")
    assert resumed.step == 8 and all(torch.equal(a[k], b[k]) for k in a)
    # "latest" named again on resuming would be the run itself: refused, not distilled from
    with pytest.raises(ConfigError, match="a checkpoint of this run itself"):
        fit(tiny(tmp_path, "loss.teacher=latest", "train.max_steps=10"), run_name="split", resume="latest")


# --------------------------------------------------------------------------- refusals


def test_a_missing_teacher_is_named_before_the_data_loads(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(trainer, "build_loaders", no_data)
    with pytest.raises(CheckpointError, match="nowhere"):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'nowhere.pt'}"), run_name="x", echo=quiet)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("data.num_classes=3", "num_classes 4, this run's data has 3"),
        ("data.channels=2", "channels 1, this run's data has 2"),
        ("data.image_size=24", "image_size 20, this run's data has 24"),
    ],
)
def test_a_teacher_that_would_see_other_inputs_is_refused(tmp_path, teacher_run, override, said):
    cfg = tiny(tmp_path, override, f"loss.teacher={teacher_run.run_dir / 'best.pt'}")
    with pytest.raises(ConfigError, match="a teacher must see the inputs it was trained on") as e:
        fit(cfg, run_name="x", echo=quiet)
    assert said in str(e.value)


def test_a_teacher_of_another_dataset_or_normalisation_is_refused(tmp_path, teacher_run):
    source = load_checkpoint(teacher_run.run_dir / "best.pt")
    other = dict(source, config={**source["config"], "data": {**source["config"]["data"], "name": "mnist"}})
    torch.save(other, tmp_path / "mnist.pt")
    with pytest.raises(ConfigError, match="data.name 'mnist', this run trains on 'synthetic'"):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'mnist.pt'}"), run_name="x", echo=quiet)
    stats = dict(source, data_info={**source["data_info"], "mean": [0.5], "std": [0.25]})
    torch.save(stats, tmp_path / "stats.pt")
    with pytest.raises(ConfigError, match=r"normalised its inputs with mean \[0.5\], this run with \[0.3"):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'stats.pt'}"), run_name="y", echo=quiet)
    per_image = dict(source, data_info={**source["data_info"], "mean": None, "std": None})
    torch.save(per_image, tmp_path / "per_image.pt")
    with pytest.raises(
        ConfigError, match="normalised its inputs by per-image standardisation, this run by mean"
    ):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'per_image.pt'}"), run_name="z", echo=quiet)


def test_a_teacher_of_other_class_names_or_channel_statistics_is_refused_without_a_traceback(
    tmp_path, teacher_run
):
    source = load_checkpoint(teacher_run.run_dir / "best.pt")
    names = dict(source, data_info={**source["data_info"], "class_names": ["d", "c", "b", "a"]})
    torch.save(names, tmp_path / "names.pt")
    with pytest.raises(
        ConfigError, match=r"trained with the classes \['d', 'c', 'b', 'a'\], this run's data"
    ):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'names.pt'}"), run_name="x", echo=quiet)
    two = dict(source, data_info={**source["data_info"], "mean": [0.5, 0.5], "std": [0.25, 0.25]})
    torch.save(two, tmp_path / "two.pt")
    with pytest.raises(
        ConfigError, match=r"normalised its inputs with mean \[0.5, 0.5\], this run with \[0.3"
    ):
        fit(tiny(tmp_path, f"loss.teacher={tmp_path / 'two.pt'}"), run_name="y", echo=quiet)


def test_a_teacher_that_may_have_trained_on_this_runs_validation_images_is_refused(tmp_path, teacher_run):
    held = ("data.val_split=0.25", "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"data.val_split: 0.0 in the checkpoint, 0.25 now"):
        fit(
            tiny(tmp_path, *held, f"loss.teacher={teacher_run.run_dir / 'best.pt'}"), run_name="x", echo=quiet
        )
    same = fit(tiny(tmp_path, *held), run_name="same-split", echo=quiet)
    fit(tiny(tmp_path, *held, f"loss.teacher={same.run_dir / 'last.pt'}"), run_name="y", echo=quiet)


def test_a_teacher_saved_without_its_data_description_is_still_checked_against_the_data(
    tmp_path, teacher_run
):
    source = load_checkpoint(teacher_run.run_dir / "best.pt")
    torch.save({k: v for k, v in source.items() if k != "data_info"}, tmp_path / "bare.pt")
    fit(
        tiny(tmp_path, "train.max_steps=1", f"loss.teacher={tmp_path / 'bare.pt'}"), run_name="ok", echo=quiet
    )
    with pytest.raises(
        ConfigError, match="takes 1-channel images into 4 classes, this run's data has 1 channels and 3"
    ):
        fit(
            tiny(tmp_path, "data.num_classes=3", f"loss.teacher={tmp_path / 'bare.pt'}"),
            run_name="x",
            echo=quiet,
        )


@pytest.mark.parametrize(
    ("override", "said"),
    [("loss.teacher_temperature=0", "must be positive"), ("loss.teacher_weight=-1", "must not be negative")],
)
def test_distillation_settings_out_of_range_are_config_errors(tmp_path, override, said):
    with pytest.raises(ConfigError, match=said):
        tiny(tmp_path, override)


def test_scoring_a_trained_model_refuses_teacher_settings(tmp_path, teacher_run):
    from capsnet.evaluate import prepare_checkpoint

    with pytest.raises(ConfigError, match="loss.teacher: a training setting"):
        prepare_checkpoint(str(teacher_run.run_dir / "best.pt"), overrides=["loss.teacher=best"])


def test_the_shipped_configs_train_without_a_teacher_by_default():
    assert load_config(None).loss.teacher is None


@pytest.mark.parametrize(
    ("data", "teacher_data", "said"),
    [
        (
            {"name": "smallnorb", "split": "azimuth"},
            {"split": "standard"},
            "data.split 'standard', this run 'azimuth'",
        ),
        (
            {"name": "folder", "train_dir": "a", "test_dir": "b"},
            {"test_dir": None},
            "data.test_dir None, this run 'b'",
        ),
    ],
)
def test_a_teacher_trained_on_other_training_images_than_this_runs_is_refused(
    tmp_path, teacher_run, data, teacher_data, said
):
    source = load_checkpoint(teacher_run.run_dir / "best.pt")
    student = tiny(tmp_path, *(f"data.{k}={v}" for k, v in data.items()), "data.val_split=0")
    saved = {**source["config"], "data": {**student.to_dict()["data"], **teacher_data}}
    info = SimpleNamespace(**source["data_info"])
    with pytest.raises(ConfigError, match="it may have trained on this run's test images") as e:
        trainer.load_teacher(
            student, info, torch.device("cpu"), tmp_path / "t.pt", dict(source, config=saved)
        )
    assert said in str(e.value)


def test_only_a_training_set_without_augmentation_has_fixed_items(tmp_path):
    from capsnet.data import build_datasets

    plain = build_datasets(tiny(tmp_path).data)[0]
    assert plain.fixed_items and plain.subset(torch.arange(4)).fixed_items
    augmented = ImageDataset(plain.images, plain.labels, lambda x: torch.zeros(1), plain.eval_transform)
    assert not augmented.fixed_items and not augmented.subset(torch.arange(4)).fixed_items
    assert augmented.subset(torch.arange(4), evaluation=True).fixed_items
