"""The rules both the API and the engine apply: one home each, no onnxruntime, no FastAPI.

- `recipe`: the recipe (the one specification of how to quantize) and its rules.
- `formats`: model and dataset formats, and the rules that fit a dataset to a model.
"""
