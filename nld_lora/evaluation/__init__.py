"""Evaluation of generated text: scorers chosen by record fields and a sandboxed execution scorer."""
