"""Ship a run as a model others can run: the top layer of the kit.

`flow.publish` reads top to bottom (targets → merge → save → GGUF → evals → lineage → card →
rename into place → upload); `merge` folds an adapter in and checks the logits, `gguf` writes
and verifies llama.cpp files, `lineage` walks a run back to its base, `card` writes the model
card, `hub` talks to the Hugging Face Hub, `samples` draws the check texts from the run's data.

Layers: this package may import `still` and `eval`; nothing imports it but `still/cli.py`.
"""
