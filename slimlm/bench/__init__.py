"""Side-by-side speed measurements: slimlm vs HF transformers vs llama.cpp on the same model and threads."""
