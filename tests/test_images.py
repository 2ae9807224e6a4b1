"""Images in NCHW against PyTorch: the conv2d / pooling references (stride, padding, dilation,
groups; max-pool ties and NaN), the layers (Conv2d by im2col + GEMM and by direct loops,
MaxPool2d, AvgPool2d, BatchNorm2d, LayerNorm over trailing axes, Flatten) compiled, with their
PyTorch state_dicts, through a training step; the shape errors; the digits CNN example."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gradfuse as gf
from gradfuse import functional as F
from gradfuse import nn
from gradfuse.errors import ShapeError
from gradfuse.ir.ops import conv

torch = pytest.importorskip("torch")
T = torch.nn
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


# ---- the references ------------------------------------------------------------------------
@pytest.mark.parametrize(("c", "o", "k", "stride", "padding", "dilation", "groups"), [
    (3, 4, 3, 1, 1, 1, 1), (4, 6, 3, 2, 1, 1, 2), (2, 4, 2, 1, 0, 2, 2), (4, 4, 3, 2, 2, 1, 4), (3, 2, 1, 3, 0, 1, 1)])
def test_conv2d_and_its_gradients_match_pytorch(c, o, k, stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, c, 7, 8)), rng.standard_normal((o, c // groups, k, k))
    a = {"stride": (stride,) * 2, "padding": (padding,) * 2, "dilation": (dilation,) * 2, "groups": groups}
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = conv.conv2d_ref(x, w, **a)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(conv.conv2d_grad_input_ref(g, w, size=x.shape[2:], **a), tx.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(conv.conv2d_grad_weight_ref(x, g, kernel=(k, k), **a), tw.grad.numpy(), atol=1e-12)
    if groups == 1:  # the GEMM form: im2col's columns times the weight as [O, C·KH·KW]
        win = {k_: a[k_] for k_ in ("stride", "padding", "dilation")}
        cols = conv.im2col_ref(x, kernel=(k, k), **win)
        rows = cols @ w.reshape(o, -1).T
        np.testing.assert_allclose(rows.transpose(0, 2, 1).reshape(y.shape), y, atol=1e-12)


@pytest.mark.parametrize(("k", "stride", "padding"), [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 1)])
def test_max_pool_ties_and_nan_go_where_pytorch_sends_them(k, stride, padding):
    """Small integers: windows full of ties (the first maximal element gets the gradient); NaN
    propagates and takes the gradient; a window of -inf gives it to its first pixel inside."""
    rng = np.random.default_rng(k + stride + padding)
    x = rng.integers(0, 3, (2, 3, 6, 7)).astype(np.float64)
    x[0, 0, 0, 0], x[1, 1, 2, :3], x[1, 2] = np.nan, np.nan, -np.inf
    a = {"kernel": (k, k), "stride": (stride, stride), "padding": (padding, padding)}
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, stride, padding)
    y = conv.max_pool2d_ref(x, **a)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    g = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(conv.max_pool2d_grad_ref(x, g, **a), tx.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize(("k", "stride", "padding"), [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_avg_pool_matches_pytorch(k, stride, padding, count_include_pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 7))
    a = {"kernel": (k, k), "stride": (stride, stride), "padding": (padding, padding),
         "count_include_pad": count_include_pad}
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, k, stride, padding, count_include_pad=count_include_pad)
    y = conv.avg_pool2d_ref(x, **a)
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-12)
    g = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(conv.avg_pool2d_grad_ref(g, size=(6, 7), **a), tx.grad.numpy(), atol=1e-12)


# ---- the layers, compiled, against PyTorch's through a training step -------------------------
class Net(nn.Module):
    def __init__(self, method: str):
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, method=method), nn.BatchNorm2d(4), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=1, padding=1, dilation=1, groups=2), nn.ReLU(),
            nn.Conv2d(6, 6, 2, stride=2, padding=1, dilation=1, method=method), nn.AvgPool2d(2, stride=1),
            nn.LayerNorm((6, 2, 2)))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


class TorchNet(T.Module):
    def __init__(self):
        super().__init__()
        self.features = T.Sequential(
            T.Conv2d(2, 4, 3, padding=1), T.BatchNorm2d(4), T.ReLU(), T.MaxPool2d(2),
            T.Conv2d(4, 6, 3, padding=1, groups=2), T.ReLU(), T.Conv2d(6, 6, 2, stride=2, padding=1),
            T.AvgPool2d(2, stride=1), T.LayerNorm((6, 2, 2)))
        self.flatten, self.head = T.Flatten(), T.Linear(24, 3)

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


@pytest.mark.parametrize("method", ["auto", "direct"])
def test_layers_train_as_pytorchs(kernel_cache, method):
    torch.manual_seed(0)
    tnet = TorchNet().double()
    with torch.no_grad():  # BatchNorm's affine parameters away from their defaults
        tnet.features[1].weight.uniform_(0.5, 1.5)
        tnet.features[1].bias.uniform_(-0.5, 0.5)
    model = gf.Model(Net(method), inputs={"x": "f32[N,2,8,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)
    model.load_state_dict(gf.from_pytorch(tnet.state_dict(), model))
    compiled = gf.compile(model, gf.SGD(), dtype="f64", cache_dir=kernel_cache)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 2, 8, 8)), rng.integers(0, 3, 5)
    loss = compiled.train_step(x, y, lr=0.1)
    tloss = torch.nn.functional.cross_entropy(tnet(torch.tensor(x)), torch.tensor(y))
    tloss.backward()
    with torch.no_grad():
        for p in tnet.parameters():
            p -= 0.1 * p.grad
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-10)
    want = gf.from_pytorch(tnet.state_dict(), model)
    got = compiled.state_dict()
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    tnet.eval()
    np.testing.assert_allclose(compiled.predict(x), tnet(torch.tensor(x)).detach().numpy(), rtol=1e-9, atol=1e-12)
    # and back: gradfuse's weights load into PyTorch's module
    tnet.load_state_dict(gf.to_pytorch(got, model, tensors=True), strict=False)


def test_the_default_lowering_is_im2col_and_one_gemm():
    g = gf.trace(nn.Conv2d(3, 8, 3, padding=1), inputs={"x": "f32[N,3,8,8]"})
    assert [n.op for n in g.nodes] == ["im2col", "reshape", "matmul", "add", "reshape", "transpose"]
    g = gf.trace(nn.Conv2d(4, 8, 3, groups=2, bias=False), inputs={"x": "f32[N,4,8,8]"})
    assert [n.op for n in g.nodes] == ["conv2d"]


# ---- errors in the user's terms --------------------------------------------------------------
@pytest.mark.parametrize(("net", "in_type", "needles"), [
    (nn.Conv2d(1, 4, 3), "f32[N,64]", ["Conv2d(1, 4, 3)", "f32[N,64]", "NCHW", "reshape"]),
    (nn.Conv2d(3, 4, 3), "f32[N,1,8,8]", ["1 channels, expected 3", "out_channels"]),
    (nn.Conv2d(1, 4, 5), "f32[N,1,3,3]", ["5x5 window", "3x3 image", "smaller kernel"]),
    (nn.MaxPool2d(3, padding=2), "f32[N,1,8,8]", ["max_pool2d", "at most half the kernel"]),
    (nn.BatchNorm2d(4), "f32[N,3,8,8]", ["BatchNorm2d(4)", "4 channels"]),
    (nn.LayerNorm((4, 4)), "f32[N,4,8]", ["LayerNorm((4, 4))", "trailing dimensions [4, 4]"]),
    (nn.AvgPool2d(2), "f32[N,8,8]", ["avg_pool2d", "NCHW"]),
])
def test_shape_errors_name_the_layer_shapes_and_fix(net, in_type, needles):
    with pytest.raises(ShapeError) as info:
        gf.trace(net, inputs={"x": in_type})
    message = str(info.value)
    assert "test_images.py" in message
    assert all(n in message for n in needles), message


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="groups=3"):
        nn.Conv2d(4, 6, 3, groups=3)


# ---- the example ---------------------------------------------------------------------------
def test_digits_cnn_learns_in_a_few_steps(kernel_cache):
    """A tiny configuration of examples/digits_cnn.py (8 channels, 4 epochs on 512 images)."""
    from gradfuse.loader import load_model

    example = load_model(os.path.join(EXAMPLES, "digits_cnn.py"))
    data = example.data()
    assert data["x_train"].shape[1:] == (1, 8, 8) and data["x_train"].dtype == np.float32
    net = type(example.net)(channels=8)
    model = gf.Model(net, inputs={"x": "f32[N,1,8,8]"}, targets={"y": "i64[N]"}, loss=F.cross_entropy)
    compiled = gf.compile(model, gf.SGD(momentum=0.9), cache_dir=kernel_cache)
    x, y = data["x_train"][:512], data["y_train"][:512]
    for _ in range(4):
        for i in range(0, 512, 32):
            compiled.train_step(x[i:i + 32], y[i:i + 32], lr=0.05)
    accuracy = (compiled.predict(data["x_test"]).argmax(1) == data["y_test"]).mean()
    assert accuracy > 0.85, accuracy
