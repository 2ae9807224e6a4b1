"""A small convolutional network for scikit-learn's 8x8 handwritten digits, as NCHW images.

    gradfuse train examples/digits_cnn.py            # about 98% test accuracy in 10 epochs
    gradfuse show examples/digits_cnn.py --stage loops   # the convolution and pooling loop nests
"""

import gradfuse as gf
from gradfuse import datasets, nn
from gradfuse import functional as F


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 16):
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),  # [N, c, 4, 4]
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [N, 2c, 2, 2]
        )
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * c * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


def images() -> dict:
    """The digits as [n, 1, 8, 8] images (one channel), labels as they are."""
    return {k: v[:, None] if k.startswith("x_") else v for k, v in datasets.digits(images=True).items()}


model = gf.Model(
    DigitsCNN(),
    inputs={"x": "f32[N,1,8,8]"},
    targets={"y": "i64[N]"},
    loss=F.cross_entropy,
    data=images,
)
