"""The ``gradfuse`` command: look at a model's IR at each stage, check IR files.

Mistakes of the user's (a bad model file, malformed IR, wrong shapes) print one line and exit 1;
only a bug in gradfuse itself prints a traceback.
"""

from __future__ import annotations

import argparse
import sys

from gradfuse.errors import GradfuseError
from gradfuse.ir.graph import Graph


def _stage_forward(model, args) -> Graph:
    return model.trace()


def _stage_loss(model, args) -> Graph:
    return model.trace(train=True, with_loss=True)


def _stage_backward(model, args) -> Graph:
    from gradfuse.stages import backward

    grads = backward(model)
    args.saved = grads.saved
    return grads.graph


def _stage_train(model, args) -> Graph:
    from gradfuse.stages import training_step

    return training_step(model, _optimizer(args), args.workers, args.bucket_mb).graph


def _stage_fused(model, args) -> Graph:
    from gradfuse.passes.manager import run_pipeline
    from gradfuse.stages import training_passes

    # from the loss graph, as compile runs them
    passes = f"{training_passes(_optimizer(args), args.workers, args.bucket_mb)},{args.pipeline}"
    result = run_pipeline(model.trace(train=True, with_loss=True), passes, dump_dir=args.dump_passes)
    args.reports = [r.report for r in result.records if r.report] if args.explain else []
    args.reports.append(result.timing_table())
    return result.graph


def _stage_kernels(model, args) -> str:
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.codegen.targets import get_backend
    from gradfuse.runtime.program import plan_storage

    graph = _stage_fused(model, args)
    prog = lower(graph, args.target)
    source = get_backend(args.target).print_module(prog, plan_storage(prog, 256, args.target))  # as compile does
    if args.target != "cuda":
        return source
    from gradfuse.codegen.ptx import with_costs

    try:
        return with_costs(source, prog)
    except (ImportError, OSError, RuntimeError) as e:  # NVVM or nvJitLink missing: the cuda extra
        raise GradfuseError(f"--target cuda: each kernel's PTX and its cost need NVVM and nvJitLink from the "
                            f"CUDA wheels (pip install 'gradfuse[cuda]'): {str(e).splitlines()[0]}") from None


def _stage_loops(model, args) -> str:
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.codegen.loop_nests import format_kernel

    return "\n\n".join(format_kernel(k) for k in lower(_stage_fused(model, args), args.target).kernels)


# stage name -> (what it shows, how to build it from a Model)
STAGES = {
    "forward": ("the inference forward graph", _stage_forward),
    "loss": ("the training-mode forward graph with the loss", _stage_loss),
    "backward": ("forward + generated backward, with the values saved for the backward", _stage_backward),
    "train": ("one whole training step: forward, backward, optimizer update", _stage_train),
    "fused": ("the training step after the pass pipeline (--pipeline), as kernels", _stage_fused),
    "loops": ("each kernel of the fused training step as loop nests: the kernel IR the backends print",
              _stage_loops),
    "kernels": ("the generated Numba source of the fused training step (--target cuda: with each kernel's "
                "registers, shared memory and spills on sm_90)", _stage_kernels),
}
DEFAULT_PIPELINE = "simplify,fuse,memory-plan"


def _optimizer(args):
    from gradfuse.passes.optimizer import SGD, Adam

    if getattr(args, "optimizer", "sgd") == "adam":
        return Adam(weight_decay=args.weight_decay)
    return SGD(momentum=getattr(args, "momentum", 0.9), weight_decay=getattr(args, "weight_decay", 0.0))


def saved_values_listing(saved, batch: int) -> str:
    """The forward values the backward reads: what training keeps in memory per batch."""
    rows = [(f"%{v.name}", str(v.type), v.type.nbytes({"N": batch})) for v in saved]
    if not rows:
        return ""
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"# values saved from the forward for the backward, at batch size N={batch}:"]
    lines += [f"#   {name:<{w0}}  {t:<{w1}}  {n:>12,} B" for name, t, n in rows]
    lines.append(f"#   {'total':<{w0}}  {'':<{w1}}  {sum(r[2] for r in rows):>12,} B")
    return "\n".join(lines) + "\n"


def _render(g: Graph, fmt: str) -> str:
    if fmt == "text":
        return str(g)
    from gradfuse.ir.dot import to_dot, to_svg

    if fmt == "dot":
        return to_dot(g)
    svg = to_svg(g)
    if svg is None:
        raise GradfuseError("--format svg needs Graphviz's `dot` program (apt-get install graphviz); "
                            "--format dot prints the DOT source instead")
    return svg


def cmd_show(args) -> int:
    from gradfuse.loader import load_model

    _check_outputs((args.dump_passes, "IR dump folder", True))
    model = load_model(args.model)
    args.saved, args.reports = None, []
    if args.pipeline is None:  # fusion and the memory plan ask the target's GEMM what it takes
        on = "" if args.target == "cpu" else f", target={args.target!r}"
        args.pipeline = DEFAULT_PIPELINE.replace("fuse", f"fuse(batch={args.batch}{on})").replace(
            "memory-plan", f"memory-plan(batch={args.batch}{on})")
    graph = STAGES[args.stage][1](model, args)
    if isinstance(graph, str):  # generated source
        sys.stdout.write(graph)
        return 0
    sys.stdout.write(_render(graph, args.format))
    if args.format == "text":
        if args.saved is not None:
            sys.stdout.write("\n" + saved_values_listing(args.saved, args.batch))
        for report in args.reports:
            sys.stdout.write("\n" + "\n".join("# " + line if line else "#" for line in report.splitlines()) + "\n")
    return 0


def cmd_gradcheck(args) -> int:
    from gradfuse import gradcheck as gc
    from gradfuse.loader import load_model

    if not args.eps > 0 or not args.tol >= 0 or args.directions < 1:
        raise GradfuseError("gradcheck needs --eps > 0, --tol >= 0 and --directions >= 1")
    model = load_model(args.model)
    report = gc.gradcheck(model, batch=args.batch, directions=args.directions, h=args.eps, tol=args.tol)
    width = max(len(r.name) for r in report)
    print(f"gradient check of {model.name} in float64: backward graph vs finite differences (step {args.eps:g}) "
          f"along {args.directions} random directions, batch {args.batch}")
    print(f"  {'parameter':<{width}}  {'shape':<12} {'rel. error':>10} {'FD noise':>9} {'‖grad‖':>10} "
          f"{'‖grad‖/‖p‖':>11}  verdict")
    for r in report:
        ratio = f"{r.grad_norm / r.param_norm:11.2e}" if r.param_norm else f"{'-':>11}"
        error, noise = ("-", "-") if r.zero else (f"{r.worst_rel_error:.2e}", f"{r.fd_noise:.1e}")
        aside = f" ({r.unresolved} of {args.directions} directions inconclusive)" if r.unresolved else ""
        print(f"  {r.name:<{width}}  {str(list(r.shape)):<12} {error:>10} {noise:>9} {r.grad_norm:10.3e} {ratio}"
              f"  {r.verdict}{aside}")
    print("rel. error: |FD - backward| / max(|FD|, |backward|), worst direction; FD noise: the finite "
          "differences' own error, measured from steps h and 2h (floor ε|L|/h), relative")
    verdicts = [r.verdict for r in report]
    if gc.OK_NOISE in verdicts:
        print(f"ok within FD noise: off by more than --tol {args.tol:g} but by less than {gc.SAFETY:g}x the FD "
              f"noise, and {gc.SAFETY:g}x the FD noise is below {gc.MAX_NOISE:g} of the derivative: right to "
              "that resolution")
    if gc.INCONCLUSIVE in verdicts:
        print(f"inconclusive: the finite differences are too noisy ({gc.SAFETY:g}x the FD noise is over "
              f"{gc.MAX_NOISE:g} of the derivative) to confirm or refute the gradient; this is not a pass: "
              "try another --eps or more --directions")
    zero = [r.name for r in report if r.zero]
    if zero:
        print(f"note: the loss does not depend on {', '.join(zero)} (its gradient is zero; e.g. a bias "
              "right before a normalisation)")
    print()
    print(f"gradient health: ‖∂L/∂(layer output)‖ over a batch of {args.health_batch}, forward order")
    for h in gc.gradient_health(model, batch=args.health_batch):
        print(f"  {h.layer:<{width}}  {str(list(h.shape)):<14} {h.grad_norm:10.3e}  {h.flag}")
    print()
    failed = [r.name for r in report if r.verdict == gc.FAILED]
    unsure = [r.name for r in report if r.verdict == gc.INCONCLUSIVE]
    worst = max((r.worst_rel_error for r in report if r.passed), default=0.0)
    if failed:
        print(f"FAILED: the backward disagrees with finite differences beyond --tol {args.tol:g} and the FD noise "
              f"for {', '.join(failed)}" + (f" (inconclusive: {', '.join(unsure)})" if unsure else ""))
    elif unsure:
        print(f"INCONCLUSIVE: finite differences too noisy to check {', '.join(unsure)}; nothing failed")
    else:
        print(f"OK: every parameter's gradient matches finite differences (worst relative error {worst:.2e}, "
              f"--tol {args.tol:g}; {verdicts.count(gc.OK_NOISE)} within FD noise)")
    return 0 if not failed and not unsure else 1


def cmd_check(args) -> int:
    from gradfuse.ir.parser import parse_graph

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise GradfuseError(f"{args.file}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise GradfuseError(f"{args.file}: not UTF-8 text (byte {e.start}); is this an IR file?") from None
    sys.stdout.write(str(parse_graph(text, file=args.file)))
    return 0


def _compile_model(args):
    import gradfuse as gf
    from gradfuse.loader import load_model

    model = load_model(args.model)
    return model, gf.compile(model, _optimizer(args), dtype=getattr(args, "dtype", None),
                             workers=getattr(args, "workers", 1), bucket_mb=getattr(args, "bucket_mb", 25.0),
                             target=getattr(args, "target", "cpu"))


def _stage_texts(model, args) -> dict[str, str]:
    """The printed IR of every stage before the passes, for an artifact's ir/ folder."""
    from gradfuse.stages import backward, training_step

    return {"forward": str(model.trace()), **({"backward": str(backward(model).graph),
                                               "train": str(training_step(model, _optimizer(args)).graph)}
                                              if model.loss is not None else {})}


def _check_outputs(*destinations: tuple[str | None, str, bool]) -> None:
    """Every (path, what, is a directory) the command will write, checked before any work."""
    from gradfuse.files import check_writable
    from gradfuse.runtime.artifact import check_destination

    for path, what, directory in destinations:
        if path:
            check_writable(path, what, directory=directory)
            if what == "artifact":
                check_destination(path)


def _load_weights(compiled, path: str) -> str:
    """Weights from a checkpoint of ``gradfuse train`` or a .npz of named arrays (a state dict);
    returns what was loaded, in words."""
    from gradfuse.data import load_npz
    from gradfuse.training import load_checkpoint

    arrays = load_npz(path, what="weights")
    if "__meta__" not in arrays:
        compiled.load_state_dict(arrays)
        return f"the weights in {path}"
    history, epoch, batch, _ = load_checkpoint(path, compiled)
    return f"the weights of checkpoint {path} (after {len(history.step_losses)} steps, epoch {epoch - (batch == 0)})"


def cmd_compile(args) -> int:
    import os
    import time

    from gradfuse.runtime import artifact

    _check_outputs((args.output, "artifact", True))
    start = time.perf_counter()
    model, compiled = _compile_model(args)
    weights = _load_weights(compiled, args.weights) if args.weights else \
        "the model's initial values, untrained (train it with `gradfuse train MODEL -o DIR`, or pass --weights)"
    report = artifact.save(compiled, args.output, _stage_texts(model, args))
    print(f"wrote {report.path}: {report.files} files, {report.bytes:,} bytes, in "
          f"{time.perf_counter() - start:.1f} s; {compiled.kernel_report()}")
    print(f"  weights:       {weights}")
    print(f"  run it:        gradfuse run {args.output} --input x.npy --output y.npy   (x.npy: a batch of "
          f"{', '.join(f'{k} {t}' for k, t in compiled.inputs.items())})")
    print(f"  read its IR:   ls {args.output}/ir   ({', '.join(sorted(os.listdir(os.path.join(report.path, 'ir'))))})")
    return 0


def _load_any(spec: str, args):
    """(the Model or None, a compiled model) from an artifact directory or a model file."""
    import os

    from gradfuse.runtime import artifact

    if os.path.isdir(spec):
        return None, artifact.load(spec, recompile=getattr(args, "recompile", False))
    return _compile_model(argparse.Namespace(**{**vars(args), "model": spec}))


def cmd_run(args) -> int:
    import time

    import numpy as np

    from gradfuse.files import atomic_file

    _check_outputs((args.output, "output", False))
    start = time.perf_counter()
    _, compiled = _load_any(args.artifact, args)
    loaded = time.perf_counter()
    from gradfuse.data import read_batch

    x = read_batch(args.input, compiled)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        rows = np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
        print(f"warning: {args.input} holds NaN/Inf in {len(rows)} of {len(x)} examples (first: row {rows[0]}); "
              "their outputs will not be finite", file=sys.stderr)
    compiled.check = args.check
    y = compiled.predict(x)
    done = time.perf_counter()
    if args.output:
        with atomic_file(args.output, "output") as f:
            np.save(f, y)
    print(f"{compiled.name}: {x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}"
          + (f", written to {args.output}" if args.output else ""))
    print(f"  load {loaded - start:.3f} s, first batch {done - loaded:.3f} s")
    if not args.output:
        print(y)
    return 0


def _model_data(model, spec: str):
    if model is None:
        raise GradfuseError("an artifact carries no data: pass --data file.npz")
    if model.data is None:
        raise GradfuseError(f"{spec} defines no data: pass --data file.npz (x_train, y_train, and optionally "
                            "x_test, y_test)")
    try:
        return model.data()
    except GradfuseError:
        raise
    except Exception as e:  # the user's data() failed
        raise GradfuseError(f"{spec}: the model's data() failed: {type(e).__name__}: {e}") from None


def _launch(args) -> int:
    """``gradfuse train --workers K ...``: the same command on K ranks of ``mpiexec``."""
    import subprocess

    from gradfuse.runtime import distributed

    cmd = distributed.mpiexec_command(args.workers, args.hostfile)
    cmd += [sys.executable, "-m", "gradfuse.cli", *args.argv]
    print(f"launching {args.workers} ranks: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def _ranks(args):
    """The MPI world when this process is one rank of several (None alone); ``--workers`` then
    follows the world's size, and ranks other than 0 print nothing (their errors say their rank)."""
    import os

    from gradfuse.runtime import distributed

    if not distributed.launched_by_mpi():
        return None
    w = distributed.world()
    if w is None:
        return None
    if args.workers not in (1, w.size):
        raise GradfuseError(f"--workers {args.workers}, but mpiexec started {w.size} ranks")
    args.workers = w.size
    if w.rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    return w


def cmd_sample(args) -> int:
    """``gradfuse sample ARTIFACT --prompt ...``: text from a character model's artifact."""
    import os

    import numpy as np

    from gradfuse.data import read_numpy
    from gradfuse.runtime import artifact
    from gradfuse.sampling import sample

    vocabulary = args.vocabulary or os.path.join(args.artifact, "vocabulary.npy")
    if not os.path.isdir(args.artifact):
        raise GradfuseError(f"{args.artifact}: not an artifact directory (write one with gradfuse train -o or "
                            "examples/char_transformer.py)")
    if not os.path.exists(vocabulary):
        raise GradfuseError(f"{vocabulary}: no vocabulary (the characters, in id order, as a .npy array): "
                            "pass --vocabulary FILE.npy")
    compiled = artifact.load(args.artifact, recompile=args.recompile)
    print(sample(compiled, np.asarray(read_numpy(vocabulary, "vocabulary")), args.prompt, args.chars,
                 args.temperature, args.seed))
    return 0


def cmd_train(args) -> int:
    import os

    from gradfuse.data import check_data, load_npz
    from gradfuse.training import TrainConfig, fit, metrics_of, plot_history, read_checkpoint

    if args.workers > 1 and not _launched():
        return _launch(args)
    world = _ranks(args)

    _check_outputs((args.output, "artifact", True), (args.checkpoint, "checkpoint", False),
                   (args.plot, "plot", False))
    if args.resume and not (args.checkpoint and os.path.exists(args.checkpoint)):
        raise GradfuseError(f"nothing to resume: no checkpoint at {args.checkpoint}" if args.checkpoint else
                            "--resume needs --checkpoint FILE (the checkpoint to go on from)")
    if args.resume:
        read_checkpoint(args.checkpoint)  # a damaged one is refused before anything is compiled
    model, compiled = _load_any(args.model, args)
    if compiled.train_program is None:
        raise GradfuseError(f"{args.model}: model {compiled.name} has no loss to train on: pass loss=... to "
                            "gradfuse.Model (e.g. loss=F.cross_entropy)")
    source = args.data or f"{args.model}'s data()"
    data = check_data(load_npz(args.data) if args.data else _model_data(model, args.model), compiled.inputs,
                      compiled.targets, compiled.prediction, source=source)
    for note in data.notes:
        print(f"note: {note}")
    metrics = metrics_of(compiled, model.metrics if model is not None else None)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         checkpoint=args.checkpoint, plot=args.plot)
    print(f"training {compiled.name} on {len(data):,} examples"
          + (f" ({len(data.test[0]):,} for testing)" if data.test else " (no test split)")
          + f": loss {metrics.loss_name}" + (f", {metrics.task} metrics" if metrics.task else ""))
    compiled.check = args.check
    try:
        history = fit(compiled, data, config, resume=args.resume, metrics=metrics)
    except KeyboardInterrupt:
        return 130
    if args.output:
        if world is None:
            _save_trained(compiled, args, model, history, config)
        else:  # running statistics averaged over the ranks (every rank takes part); rank 0 writes
            from gradfuse.runtime import distributed

            with distributed.averaged_buffers(world, compiled):
                if not world.rank:
                    with distributed.alone():  # the artifact's warm-up runs the step on rank 0 alone
                        _save_trained(compiled, args, model, history, config)
            world.barrier("the artifact (written by rank 0)")
    if args.plot and history.epoch and (world is None or not world.rank):
        plot_history(history, args.plot, compiled.name, metrics)
        print(f"wrote the curves to {args.plot}")
    return 0


def _save_trained(compiled, args, model, history, config) -> None:
    """The artifact; if it cannot be written, the weights in a checkpoint elsewhere (said in the error)."""
    from gradfuse.files import FileError
    from gradfuse.runtime import artifact
    from gradfuse.training import rescued

    try:
        artifact.save(compiled, args.output, _stage_texts(model, args) if model is not None else None)
    except FileError as e:
        raise rescued(e, compiled, history, config.epochs + 1, 0, config, "the trained weights are safe in {path} "
                      "(make the artifact later: gradfuse compile MODEL.py --weights {path} -o DIR)") from None
    print(f"wrote the trained model to {args.output}")


def _launched() -> bool:
    from gradfuse.runtime.distributed import launched_by_mpi

    return launched_by_mpi()


def cmd_explore(args) -> int:
    import os

    from gradfuse.explore import explore

    output = args.output or os.path.splitext(os.path.basename(args.model.rstrip("/").split(":")[0]))[0] + ".html"
    _check_outputs((output, "page", False))
    command = "gradfuse explore " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["explore"] else ""
    report = explore(args.model, output, batch=args.batch, optimizer=_optimizer(args), profile=args.profile,
                     gradcheck=args.gradcheck, command=command, dtype=args.dtype)
    print(f"wrote {report.path}: {report.bytes:,} bytes, {report.nodes:,} nodes in {report.layouts} layouts, "
          f"in {report.seconds:.1f} s")
    print(f"  open it:  file://{os.path.abspath(report.path)}   (a node: #%grad.NAME, a kernel: #kernels/k:k3)")
    return 0


def cmd_bench(args) -> int:
    from gradfuse.bench import main as bench

    if args.target == "cudasim":
        raise GradfuseError("bench --target cudasim would time Numba's simulator, which runs each GPU thread as "
                            "Python: benchmark --target cuda on a machine with an NVIDIA GPU, or --target cpu")
    if args.target == "cuda":
        from gradfuse.codegen.targets import get_backend

        get_backend("cuda").require()  # no GPU here: says so
        from gradfuse.bench import write_results
        from gradfuse.bench_cuda import main as bench_cuda

        return write_results(bench_cuda(args.quick), args.json)
    return bench(args.only, args.json, args.quick)


def _target_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=["cpu", "cuda", "cudasim"], default="cpu",
                   help="what the kernels run on: cpu; cuda (an NVIDIA GPU); cudasim (the CUDA kernels in Numba's "
                        "simulator on the CPU, slow: for checking; needs NUMBA_ENABLE_CUDASIM=1)")


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="the update of the training step")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (as PyTorch's SGD and Adam)")
    p.add_argument("--dtype", choices=["f32", "f64"], default=None,
                   help="compute every float in this precision (f64 to check numerics; default: the model's, f32)")
    p.add_argument("--workers", type=int, default=1,
                   help="data-parallel ranks: the gradients are all-reduced (mean) across them before the update; "
                        "`train --workers K` starts mpiexec itself, under `mpiexec -n K` it is the number of ranks")
    p.add_argument("--bucket-mb", type=float, default=25.0,
                   help="with --workers: gradients all-reduced together, in backward order, up to this many MB")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help texts end with the option's default, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default is not None and action.default is not False \
                and action.default != argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradfuse", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    show = sub.add_parser("show", help="print a model's IR at a stage of the pipeline")
    show.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    show.add_argument("--stage", choices=list(STAGES), default="forward",
                      help="; ".join(f"{k}: {v[0]}" for k, v in STAGES.items()))
    show.add_argument("--format", choices=["text", "dot", "svg"], default="text", help="how to print the graph")
    show.add_argument("--batch", type=int, default=256, help="batch size N for the memory figures")
    show.add_argument("--pipeline", default=None,
                      help=f"passes for --stage fused, e.g. '{DEFAULT_PIPELINE}' (the default)")
    show.add_argument("--explain", action="store_true",
                      help="with --stage fused: each pass's report (fusion decisions, memory plan)")
    show.add_argument("--dump-passes", metavar="DIR", default=None,
                      help="write the IR after each pass to DIR (also: GRADFUSE_DUMP=DIR)")
    _optimizer_flags(show)
    _target_flag(show)
    show.set_defaults(run=cmd_show)

    gc = sub.add_parser("gradcheck", help="check the backward graph against finite differences (float64); "
                                          "report per-layer gradient norms",
                        description="Compare each parameter's gradient from the backward graph (float64) with a "
                                    "4-point central finite difference along random unit directions, measure the "
                                    "finite differences' own error from a second step (2h), and pass a parameter "
                                    "that agrees within --tol or within that error. Exit 0 when every parameter "
                                    "passes, 1 when one fails or is inconclusive.")
    gc.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    gc.add_argument("--batch", type=int, default=8, help="batch size of the checked loss (default: %(default)s)")
    gc.add_argument("--directions", type=int, default=3,
                    help="random directions per parameter (default: %(default)s)")
    gc.add_argument("--eps", type=float, default=1e-3,  # = gradcheck.DEFAULT_EPS (not imported: startup time)
                    help="finite-difference step h along a unit direction (default: %(default)g ≈ ε^(1/5) for "
                         "float64: the O(h⁴) stencil's truncation and its rounding noise ε|L|/h balance there; "
                         "1e-5 lets rounding swamp the tiny derivatives of a deep net's early layers)")
    gc.add_argument("--tol", "--tolerance", dest="tol", type=float, default=1e-6,  # = gradcheck.DEFAULT_TOL
                    help="relative error that passes outright (default: %(default)g); larger errors pass only "
                         "within the measured finite-difference noise")
    gc.add_argument("--health-batch", type=int, default=64,
                    help="batch size for the gradient-health table (default: %(default)s)")
    gc.set_defaults(run=cmd_gradcheck)

    comp = sub.add_parser("compile", help="compile a model ahead of time into an artifact directory")
    comp.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    comp.add_argument("-o", "--output", required=True, help="the artifact directory to write")
    comp.add_argument("--weights", help="start from these weights: a checkpoint of `gradfuse train`, or a .npz of "
                                        "named arrays (state dict); without it the artifact holds the initial, "
                                        "untrained weights")
    _optimizer_flags(comp)
    _target_flag(comp)
    comp.set_defaults(run=cmd_compile)

    run = sub.add_parser("run", help="run an artifact (or a model file) on an input array")
    run.add_argument("artifact", help="an artifact directory (or a model .py file)")
    run.add_argument("--input", required=True, help="a batch of inputs: a .npy file, or FILE.npz:ARRAY (e.g. the "
                                                     "x_test of a --data file)")
    run.add_argument("--output", help="write the outputs to this .npy file")
    run.add_argument("--check", action="store_true", help="run kernel by kernel and stop at the first op that makes "
                                                          "a NaN/Inf, naming it and its source line")
    run.add_argument("--recompile", action="store_true", help="accept an artifact built for another CPU or "
                                                              "Numba version and compile its kernels here")
    _target_flag(run)  # for a model file; an artifact runs where it was compiled for
    run.set_defaults(run=cmd_run)

    tr = sub.add_parser("train", help="train a model file or an artifact")
    tr.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT), or an artifact directory")
    tr.add_argument("--data", help=".npz with x_train, y_train (and x_test, y_test); default: the model's data()")
    tr.add_argument("--epochs", type=int, default=10, help="train until this epoch (also when resuming)")
    tr.add_argument("--batch-size", type=int, default=64, help="examples per step")
    tr.add_argument("--lr", type=float, default=0.05, help="learning rate")
    tr.add_argument("--seed", type=int, default=0, help="the shuffle of every epoch follows from it")
    tr.add_argument("--checkpoint", help="checkpoint .npz, written every epoch and on Ctrl-C")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--plot", help="write the loss and metric curves to this PNG")
    tr.add_argument("-o", "--output", help="write the trained model as an artifact here")
    tr.add_argument("--check", action="store_true", help="run kernel by kernel and stop at the first op that makes "
                                                         "a NaN/Inf, naming it (slower)")
    tr.add_argument("--recompile", action="store_true", help="accept an artifact built for another CPU or Numba "
                                                             "version and compile its kernels here")
    tr.add_argument("--hostfile", help="with --workers: run the ranks on the machines of this Open MPI host file "
                                       "(one line per machine: `host slots=N`); the model, data and checkpoint paths "
                                       "must exist on every machine")
    _optimizer_flags(tr)
    _target_flag(tr)
    tr.set_defaults(run=cmd_train)

    ex = sub.add_parser("explore", help="write one self-contained HTML page linking the forward graph, the "
                                        "backward, the kernels, their source and the reports",
                        description="Write a page that opens from disk with no network: the forward graph, the "
                                    "generated backward and the fused training step as layered graphs collapsed "
                                    "to one box per layer and kernel, linked to the VJP rules, the model's source, "
                                    "the fusion report, the memory plan and the generated kernels.")
    ex.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT), or an artifact directory")
    ex.add_argument("-o", "--output", help="the HTML file to write (default: MODEL.html here)")
    ex.add_argument("--batch", type=int, default=256, help="batch size N for bytes, fusion and the memory plan")
    ex.add_argument("--profile", action="store_true", help="compile and time each kernel over a few steps")
    ex.add_argument("--gradcheck", action="store_true", help="add the gradient-health report per layer (float64)")
    _optimizer_flags(ex)  # for a model file: an artifact shows the training step it was compiled with
    ex.set_defaults(run=cmd_explore)

    bench = sub.add_parser("bench", help="benchmarks beside numpy, PyTorch and JAX (when installed)")
    bench.add_argument("--only", nargs="*", help="mlp, transformer, gelu-layernorm, compile, mpi (data-parallel "
                                                  "at 1 and 2 ranks: needs the mpi extra)")
    bench.add_argument("--json", help="also write the measurements to this JSON file")
    bench.add_argument("--quick", action="store_true", help="shorter timing runs")
    _target_flag(bench)
    bench.set_defaults(run=cmd_bench)

    sm = sub.add_parser("sample", help="continue a prompt with a character model's artifact "
                                       "(examples/char_transformer.py)")
    sm.add_argument("artifact", help="an artifact directory")
    sm.add_argument("--prompt", default="The ", help="the text to continue")
    sm.add_argument("--chars", type=int, default=300, help="characters to add")
    sm.add_argument("--temperature", type=float, default=0.8, help="below 1: likelier characters, above: more varied")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--vocabulary", help="the characters in id order, a .npy (default: the artifact's vocabulary.npy)")
    sm.add_argument("--recompile", action="store_true", help="accept an artifact built for another CPU")
    sm.set_defaults(run=cmd_sample)

    check = sub.add_parser("check", help="parse and verify an IR file, print it back")
    check.add_argument("file", help="a .gfir text file")
    check.set_defaults(run=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except GradfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        if _launched():  # one rank of several: leave now (MPI_Finalize would wait for the others)
            from gradfuse.runtime.distributed import exit_now

            exit_now(1)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gradfuse show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
