"""The stages from a model to its training step, each a graph users can print: the DSL end of
the pipeline, which runs the ``autodiff`` and ``optimizer`` passes on the model's loss graph."""

from __future__ import annotations

from gradfuse.model import Model
from gradfuse.passes.autodiff import Gradients, differentiate
from gradfuse.passes.optimizer import SGD, Adam, OptimizerStep, TrainingStep, add_optimizer


def backward(model: Model) -> Gradients:
    """Forward (training mode, with the loss) and backward: loss, prediction, then gradients."""
    return differentiate(model.trace(train=True, with_loss=True))


def training_step(model: Model, optimizer: SGD | Adam | None = None) -> TrainingStep:
    """Forward, backward and the optimizer's update of every parameter, as one graph."""
    return add_optimizer(backward(model), optimizer or SGD())


def training_passes(optimizer: SGD | Adam | None = None) -> str:
    """The passes that make a training step of a loss graph, as a pipeline string."""
    return f"autodiff,{OptimizerStep.of(optimizer or SGD()).spec()}"
