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
    from gradfuse.passes.training import backward

    grads = backward(model)
    args.saved = grads.saved
    return grads.graph


def _stage_train(model, args) -> Graph:
    from gradfuse.passes.training import training_step

    return training_step(model, _optimizer(args)).graph


def _stage_fused(model, args) -> Graph:
    from gradfuse.passes.manager import run_pipeline
    from gradfuse.passes.training import training_step

    result = run_pipeline(training_step(model, _optimizer(args)).graph, args.pipeline, dump_dir=args.dump_passes)
    args.reports = [r.report for r in result.records if r.report] if args.explain else []
    args.reports.append(result.timing_table())
    return result.graph


def _stage_kernels(model, args) -> str:
    from gradfuse.codegen.cpu import print_module
    from gradfuse.codegen.kernel_ir import lower
    from gradfuse.runtime.program import in_place_updates

    graph = _stage_fused(model, args)
    return print_module(lower(graph), in_place=in_place_updates(graph, 256))  # as Program.compile prints it


# stage name -> (what it shows, how to build it from a Model)
STAGES = {
    "forward": ("the inference forward graph", _stage_forward),
    "loss": ("the training-mode forward graph with the loss", _stage_loss),
    "backward": ("forward + generated backward, with the values saved for the backward", _stage_backward),
    "train": ("one whole training step: forward, backward, optimizer update", _stage_train),
    "fused": ("the training step after the pass pipeline (--pipeline), as kernels", _stage_fused),
    "kernels": ("the generated Numba CPU source of the fused training step", _stage_kernels),
}
DEFAULT_PIPELINE = "simplify,fuse,memory-plan"


def _optimizer(args):
    from gradfuse.passes.optimizer import SGD, Adam

    if args.optimizer == "adam":
        return Adam(weight_decay=args.weight_decay)
    return SGD(momentum=args.momentum, weight_decay=args.weight_decay)


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

    model = load_model(args.model)
    args.saved, args.reports = None, []
    if args.pipeline is None:
        args.pipeline = DEFAULT_PIPELINE.replace("fuse", f"fuse(batch={args.batch})").replace(
            "memory-plan", f"memory-plan(batch={args.batch})")
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
    from gradfuse.gradcheck import gradcheck, gradient_health
    from gradfuse.loader import load_model

    model = load_model(args.model)
    report = gradcheck(model, batch=args.batch, directions=args.directions)
    width = max(len(r.name) for r in report)
    print(f"gradient check of {model.name} in float64: backward graph vs finite differences "
          f"along {args.directions} random directions, batch {args.batch}")
    print(f"  {'parameter':<{width}}  {'shape':<12} {'worst rel. error':>16} {'‖grad‖':>10} {'‖grad‖/‖p‖':>11}")
    worst = 0.0
    for r in report:
        ratio = f"{r.grad_norm / r.param_norm:11.2e}" if r.param_norm else f"{'-':>11}"
        error = "zero grad" if r.zero else f"{r.worst_rel_error:.2e}"
        print(f"  {r.name:<{width}}  {str(list(r.shape)):<12} {error:>16} {r.grad_norm:10.3e} {ratio}")
        worst = max(worst, r.worst_rel_error)
    ok = worst < args.tolerance
    print(f"worst relative error {worst:.2e}: {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g})")
    zero = [r.name for r in report if r.zero]
    if zero:
        print(f"note: the loss does not depend on {', '.join(zero)} (its gradient is zero; e.g. a bias "
              "right before a normalisation)")
    print()
    print(f"gradient health: ‖∂L/∂(layer output)‖ over a batch of {args.health_batch}, forward order")
    for h in gradient_health(model, batch=args.health_batch):
        print(f"  {h.layer:<{width}}  {str(list(h.shape)):<14} {h.grad_norm:10.3e}  {h.flag}")
    return 0 if ok else 1


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
    return model, gf.compile(model, _optimizer(args))


def _stage_texts(model, args) -> dict[str, str]:
    from gradfuse.passes.training import backward, training_step

    return {"forward": str(model.trace()), **({"backward": str(backward(model).graph),
                                               "train": str(training_step(model, _optimizer(args)).graph)}
                                              if model.loss is not None else {})}


def cmd_compile(args) -> int:
    import time

    from gradfuse.runtime import artifact

    if args.target != "cpu":
        raise GradfuseError(f"target {args.target!r} is not available yet (targets: cpu)")
    start = time.perf_counter()
    model, compiled = _compile_model(args)
    report = artifact.save(compiled, args.output, _stage_texts(model, args))
    print(f"wrote {report.path}: {report.files} files, {report.bytes:,} bytes, in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"  run it:        gradfuse run {args.output} --input x.npy --output y.npy")
    print(f"  read its IR:   ls {args.output}/ir   (forward, backward, train, *.fused)")
    return 0


def _load_any(spec: str, args):
    """A compiled model from an artifact directory or a model file."""
    import os

    from gradfuse.runtime import artifact

    if os.path.isdir(spec):
        return artifact.load(spec, recompile=getattr(args, "recompile", False))
    return _compile_model(argparse.Namespace(**{**vars(args), "model": spec}))[1]


def cmd_run(args) -> int:
    import time

    import numpy as np

    start = time.perf_counter()
    compiled = _load_any(args.artifact, args)
    loaded = time.perf_counter()
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GradfuseError(f"{args.input}: cannot read it as a .npy array: {e}") from None
    y = compiled.predict(x)
    done = time.perf_counter()
    if args.output:
        np.save(args.output, y)
    print(f"{compiled.name}: {x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}"
          + (f", written to {args.output}" if args.output else ""))
    print(f"  load {loaded - start:.3f} s, first batch {done - loaded:.3f} s")
    if not args.output:
        print(y)
    return 0


def cmd_train(args) -> int:
    import os

    from gradfuse.training import TrainConfig, fit, load_data

    compiled = _load_any(args.model, args)
    if args.data:
        data = load_data(args.data)
    else:
        from gradfuse.loader import load_model

        if os.path.isdir(args.model):
            raise GradfuseError("an artifact carries no data: pass --data file.npz")
        model = load_model(args.model)
        if model.data is None:
            raise GradfuseError(f"{args.model} defines no data: pass --data file.npz (x_train, y_train, ...)")
        data = model.data()
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         checkpoint=args.checkpoint, plot=args.plot)
    try:
        fit(compiled, data, config, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    if args.output:
        from gradfuse.runtime import artifact

        artifact.save(compiled, args.output)
        print(f"wrote the trained model to {args.output}")
    return 0


def cmd_bench(args) -> int:
    from gradfuse.bench import main as bench

    return bench(args.only, args.json, args.quick)


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradfuse", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = sub.add_parser("show", help="print a model's IR at a stage of the pipeline")
    show.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    show.add_argument("--stage", choices=list(STAGES), default="forward",
                      help="; ".join(f"{k}: {v[0]}" for k, v in STAGES.items()))
    show.add_argument("--format", choices=["text", "dot", "svg"], default="text")
    show.add_argument("--batch", type=int, default=256, help="batch size N for the memory figures")
    show.add_argument("--pipeline", default=None,
                      help=f"passes for --stage fused, e.g. '{DEFAULT_PIPELINE}' (the default)")
    show.add_argument("--explain", action="store_true",
                      help="with --stage fused: each pass's report (fusion decisions, memory plan)")
    show.add_argument("--dump-passes", metavar="DIR", default=None,
                      help="write the IR after each pass to DIR (also: GRADFUSE_DUMP=DIR)")
    _optimizer_flags(show)
    show.set_defaults(run=cmd_show)

    gc = sub.add_parser("gradcheck", help="check the backward graph against finite differences (float64); "
                                          "report per-layer gradient norms")
    gc.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    gc.add_argument("--batch", type=int, default=8)
    gc.add_argument("--directions", type=int, default=3, help="random directions per parameter")
    gc.add_argument("--tolerance", type=float, default=1e-6)
    gc.add_argument("--health-batch", type=int, default=64)
    gc.set_defaults(run=cmd_gradcheck)

    comp = sub.add_parser("compile", help="compile a model ahead of time into an artifact directory")
    comp.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT)")
    comp.add_argument("--target", default="cpu", help="cpu (the default)")
    comp.add_argument("-o", "--output", required=True, help="the artifact directory to write")
    _optimizer_flags(comp)
    comp.set_defaults(run=cmd_compile)

    run = sub.add_parser("run", help="run an artifact (or a model file) on an input array")
    run.add_argument("artifact", help="an artifact directory (or a model .py file)")
    run.add_argument("--input", required=True, help="a .npy file with a batch of inputs")
    run.add_argument("--output", help="write the outputs to this .npy file")
    run.add_argument("--recompile", action="store_true", help="accept an artifact built for another CPU or "
                                                              "Numba version and compile its kernels here")
    run.set_defaults(run=cmd_run)

    tr = sub.add_parser("train", help="train a model file or an artifact")
    tr.add_argument("model", help="a Python file defining `model` (or FILE.py:OBJECT), or an artifact directory")
    tr.add_argument("--data", help=".npz with x_train, y_train (and x_test, y_test); default: the model's data()")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=0.05)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint", help="checkpoint .npz, written every epoch and on Ctrl-C")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--plot", help="write loss/accuracy curves to this PNG")
    tr.add_argument("-o", "--output", help="write the trained model as an artifact here")
    tr.add_argument("--recompile", action="store_true")
    _optimizer_flags(tr)
    tr.set_defaults(run=cmd_train)

    bench = sub.add_parser("bench", help="benchmarks beside numpy, PyTorch and JAX (when installed)")
    bench.add_argument("--only", nargs="*", help="mlp, gelu-layernorm, compile")
    bench.add_argument("--json", help="also write the measurements to this JSON file")
    bench.add_argument("--quick", action="store_true", help="shorter timing runs")
    bench.set_defaults(run=cmd_bench)

    check = sub.add_parser("check", help="parse and verify an IR file, print it back")
    check.add_argument("file", help="a .gfir text file")
    check.set_defaults(run=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GradfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gradfuse show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
