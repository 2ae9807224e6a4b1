"""The stages from a model to its training step, each a graph users can print."""

from __future__ import annotations

from gradfuse.model import Model

from .autodiff import Gradients, differentiate
from .optimizer import SGD, Adam, TrainingStep, add_optimizer


def backward(model: Model) -> Gradients:
    """Forward (training mode, with the loss) and backward: loss, prediction, then gradients."""
    return differentiate(model.trace(train=True, with_loss=True))


def training_step(model: Model, optimizer: SGD | Adam | None = None) -> TrainingStep:
    """Forward, backward and the optimizer's update of every parameter, as one graph."""
    return add_optimizer(backward(model), optimizer or SGD())
