"""The graph IR: types, values/nodes/graphs, the op registry, verifier, interpreter, text form."""
