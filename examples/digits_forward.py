"""Run the digits MLP forward with the reference interpreter on the real test set, and check it
against a hand-written numpy forward pass (z = x W + b; a = relu(z))."""

import os
import runpy

import numpy as np

import gradfuse as gf

here = os.path.dirname(os.path.abspath(__file__))
model = runpy.run_path(os.path.join(here, "digits_mlp.py"))["model"]
data = model.data()
weights = model.initial_values()

graph = model.trace()
(logits,) = gf.interpret(graph, {"x": data["x_test"], **weights}).outputs

h = np.maximum(data["x_test"] @ weights["fc1.weight"] + weights["fc1.bias"], 0)
expected = h @ weights["fc2.weight"] + weights["fc2.bias"]
error = np.abs(logits - expected).max()
print(f"interpreter vs numpy on {len(logits)} test digits: max |difference| = {error:.2e}")
print(f"accuracy of the untrained model: {(logits.argmax(1) == data['y_test']).mean():.1%}")
assert error < 1e-4
