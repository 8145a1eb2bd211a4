"""Accuracy: `slidesparse eval` (perplexity.py), the perplexity of a served model, measured
through vLLM's prompt logprobs, so that it is the number of what vLLM serves."""
