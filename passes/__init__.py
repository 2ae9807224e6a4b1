"""Graph-to-graph passes (autodiff, optimizer steps, simplification, fusion, memory planning)."""
