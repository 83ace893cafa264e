"""Question-answering evaluation: metrics, eval sets, batched generation, reports."""
