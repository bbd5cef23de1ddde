"""Tests of BatchNorm re-estimation before probing (streaming_ssl.probe.recalibrate_batchnorm)."""

from __future__ import annotations

import torch

from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.probe import extract_features, recalibrate_batchnorm
from streaming_ssl.seeds import derive_seed

CPU = torch.device("cpu")


def _model_with_stale_statistics() -> EMPSSLModel:
    torch.manual_seed(0)
    model = EMPSSLModel(width=1 / 16, feature_dim=32, proj_hidden_dim=32, proj_dim=16)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(5.0)  # as if the last batches came from another distribution
            m.running_var.fill_(9.0)
            m.num_batches_tracked.fill_(123)
    return model.train()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _augment() -> MultiPatchAugment:
    return MultiPatchAugment(4, 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _stem_bn(model: EMPSSLModel) -> torch.nn.BatchNorm2d:
    return model.backbone.stem[1]


def test_statistics_are_the_exact_average_over_the_drawn_images():
    """Every batch weighs the same: with whole batches, the mean is the mean over all drawn images (so it does not
    depend on the batch size), and the variance the average of the unbiased batch variances."""
    images, augment = _images(32), _augment()
    model = _model_with_stale_statistics()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    used = recalibrate_batchnorm(model, images, augment, n_images=32, device=CPU, batch_size=8)
    assert used == 32
    bn = _stem_bn(model)
    with torch.no_grad():
        conv = model.backbone.stem[0](augment.whole_image(images))  # every image: the draw is a permutation
        batches = conv.split(8)  # the drawn order is sorted, so batch k holds images 8k..8k+7
    expected_var = torch.stack([b.transpose(0, 1).reshape(b.shape[1], -1).var(1) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, conv.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1
    other = _model_with_stale_statistics()
    recalibrate_batchnorm(other, images, augment, n_images=32, device=CPU, batch_size=16)
    torch.testing.assert_close(_stem_bn(other).running_mean, bn.running_mean, rtol=1e-4, atol=1e-5)
    # weights untouched, the projector (not on the path to h) keeps its statistics, modes restored
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert all(torch.equal(v, projector[k]) for k, v in model.projector.state_dict().items())
    assert model.training and all(m.training for m in model.modules())


def test_subset_is_seeded_and_changes_the_features():
    images, augment = _images(40), _augment()
    a, b, c = (_model_with_stale_statistics() for _ in range(3))
    recalibrate_batchnorm(a, images, augment, n_images=12, device=CPU, batch_size=4, seed=3)
    recalibrate_batchnorm(b, images, augment, n_images=12, device=CPU, batch_size=4, seed=3)
    recalibrate_batchnorm(c, images, augment, n_images=12, device=CPU, batch_size=4, seed=4)
    assert torch.equal(_stem_bn(a).running_mean, _stem_bn(b).running_mean)
    assert not torch.equal(_stem_bn(a).running_mean, _stem_bn(c).running_mean)
    stale = _model_with_stale_statistics()
    fa = extract_features(a, images[:8], augment, device=CPU, batch_size=8)
    fs = extract_features(stale, images[:8], augment, device=CPU, batch_size=8)
    assert not torch.allclose(fa, fs)
    # with fresh statistics the first normalised layer is centred over the images it saw
    with torch.no_grad():
        a.eval()
        order = torch.randperm(40, generator=torch.Generator().manual_seed(derive_seed(3, "batchnorm images")))[:12]
        out = a.backbone.stem[1](a.backbone.stem[0](augment.whole_image(images[order])))
    assert out.mean((0, 2, 3)).abs().max() < 1e-3


def test_patches_use_the_probed_form_and_zero_images_do_nothing():
    images, augment = _images(16), _augment()
    whole, patched = _model_with_stale_statistics(), _model_with_stale_statistics()
    recalibrate_batchnorm(whole, images, augment, n_images=16, device=CPU, batch_size=8)
    recalibrate_batchnorm(patched, images, augment, n_images=16, device=CPU, batch_size=8, patches=3)
    # 3 patches per image, each batch of 8 images is one normalisation batch of 24 patches
    assert int(_stem_bn(patched).num_batches_tracked) == 2
    assert not torch.allclose(_stem_bn(whole).running_var, _stem_bn(patched).running_var)
    untouched = _model_with_stale_statistics()
    assert recalibrate_batchnorm(untouched, images, augment, n_images=0, device=CPU) == 0
    assert float(_stem_bn(untouched).running_mean[0]) == 5.0 and int(_stem_bn(untouched).num_batches_tracked) == 123


def test_stream_evaluator_probes_a_recalibrated_copy():
    """eval.bn_recalibrate: the row is that of a copy recalibrated on the probe's training images (in-domain and
    per transfer set), and the trained model keeps its own statistics."""
    from streaming_ssl.evaluation import ProbeSet, StreamEvaluator

    gen = torch.Generator().manual_seed(5)
    sets = [ProbeSet(name, _images(24, seed), torch.randint(0, 3, (24,), generator=gen), _images(12, seed + 1),
                     torch.randint(0, 3, (12,), generator=gen), 3) for name, seed in (("a", 10), ("b", 20))]
    kw = dict(transfer=[sets[1]], parent_classes=[[0, 1], [2]], augment=_augment(), device=CPU, channels_last=False,
              batch_size=8, knn_k=3, probe_kwargs={"epochs": 3}, seed=2)
    model = _model_with_stale_statistics()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = StreamEvaluator(in_domain=sets[0], bn_recalibrate=16, **kw).evaluate(model, 1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stale = StreamEvaluator(in_domain=sets[0], **kw).evaluate(model, 1)

    def by_hand(probe_set):  # the same recalibration applied to a fresh copy, then the plain evaluator
        m = _model_with_stale_statistics()
        recalibrate_batchnorm(m, probe_set.train_images, _augment(), n_images=16, device=CPU, batch_size=8, seed=2)
        return m

    ours = StreamEvaluator(in_domain=sets[0], **{**kw, "transfer": []}).evaluate(by_hand(sets[0]), 1)
    theirs = StreamEvaluator(in_domain=sets[1], **{**kw, "transfer": []}).evaluate(by_hand(sets[1]), 1)
    assert row["probe/acc_matrix_row"] == ours["probe/acc_matrix_row"] and row["knn/acc_all"] == ours["knn/acc_all"]
    assert row["transfer/b"] == theirs["probe/acc_all"]
    assert stale["probe/acc_matrix_row"] != row["probe/acc_matrix_row"] or stale["knn/acc_all"] != row["knn/acc_all"]
