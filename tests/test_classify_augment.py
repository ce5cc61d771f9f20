"""Batched augmentation: shapes, ranges, seeded determinism, and no mirroring when flips are off."""
import torch

from dualpseudo.classify import augment


def _images(n=16, c=1, size=28, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_and_range():
    for c, size in ((1, 28), (3, 32), (1, 16)):
        x = _images(12, c, size)
        for y in (augment.weak(x, _gen(), True), augment.strong(x, _gen(), True, 2, 0.5)):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()


def test_seeded_determinism():
    x = _images()
    assert torch.equal(augment.weak(x, _gen(3), True), augment.weak(x, _gen(3), True))
    assert torch.equal(augment.strong(x, _gen(3), True, 3, 0.5), augment.strong(x, _gen(3), True, 3, 0.5))
    assert not torch.equal(augment.strong(x, _gen(3), True), augment.strong(x, _gen(4), True))


def test_weak_is_a_shifted_crop():
    x = _images(64)
    y = augment.weak(x, _gen(), hflip=False, pad=2)
    # every output equals the reflect-padded input cropped at some offset in [0, 4]^2
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        assert any(torch.equal(y[i], padded[i, :, a:a + 28, b:b + 28]) for a in range(5) for b in range(5))


def test_flip_off_never_mirrors():
    # a left/right-asymmetric image: the bright half must stay on the left under weak and strong views
    x = -torch.ones(200, 1, 28, 28)
    x[..., :, :10] = 1.0
    for y in (augment.weak(x, _gen(), hflip=False), augment.strong(x, _gen(), hflip=False, num_ops=0, cutout=0)):
        assert (y[..., :, :6].mean((1, 2, 3)) > y[..., :, -6:].mean((1, 2, 3))).all()
    flipped = augment.weak(x, _gen(), hflip=True)
    mirrored = flipped[..., :, :6].mean((1, 2, 3)) < flipped[..., :, -6:].mean((1, 2, 3))
    assert 0.3 < mirrored.float().mean() < 0.7


def test_each_op_keeps_range():
    u = (_images(8, 3, 32) + 1) / 2
    v = torch.rand(8, generator=_gen())
    for name in augment.COLOR_OPS:
        out = augment._color_op(name, u, v)
        assert out.shape == u.shape and out.min() >= 0 and out.max() <= 1, name
    sign = torch.ones(8)
    for name in augment.GEOMETRIC_OPS:
        m = augment._geometric_matrix(name, torch.zeros(8), sign)
        assert torch.allclose(m, torch.eye(3).expand(8, 3, 3)), name   # magnitude 0 is the identity


def test_strong_differs_from_weak_and_cutout_fills():
    x = _images(32)
    s = augment.strong(x, _gen(), hflip=False, num_ops=0, cutout=0.9)
    # Cutout fills with gray (0 in [-1, 1]); some image must contain a filled square
    assert ((s == 0).flatten(1).sum(1) > 4).any()
