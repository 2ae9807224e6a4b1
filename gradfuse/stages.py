"""The stages from a model to its training step, each a graph users can print: the DSL end of
the pipeline, which runs the ``autodiff`` and ``optimizer`` passes on the model's loss graph."""

from __future__ import annotations

from gradfuse.model import Model
from gradfuse.passes.autodiff import Gradients, differentiate
from gradfuse.passes.distributed import DEFAULT_BUCKET_MB, AllReduce, add_allreduce
from gradfuse.passes.optimizer import SGD, Adam, OptimizerStep, TrainingStep, add_optimizer


def backward(model: Model) -> Gradients:
    """Forward (training mode, with the loss) and backward: loss, prediction, then gradients."""
    return differentiate(model.trace(train=True, with_loss=True))


def training_step(model: Model, optimizer: SGD | Adam | None = None, workers: int = 1,
                  bucket_mb: float = DEFAULT_BUCKET_MB) -> TrainingStep:
    """Forward, backward and the optimizer's update of every parameter, as one graph; with
    ``workers`` > 1 the gradients are averaged over the ranks (all-reduce) before the update."""
    grads = backward(model)
    if workers > 1:
        from gradfuse.passes.autodiff import gradients_of

        grads = gradients_of(add_allreduce(grads.graph, workers, bucket_mb)[0])
    return add_optimizer(grads, optimizer or SGD())


def training_passes(optimizer: SGD | Adam | None = None, workers: int = 1,
                    bucket_mb: float = DEFAULT_BUCKET_MB) -> str:
    """The passes that make a training step of a loss graph, as a pipeline string."""
    reduce = f"{AllReduce(workers, bucket_mb).spec()}," if workers > 1 else ""
    return f"autodiff,{reduce}{OptimizerStep.of(optimizer or SGD()).spec()}"
