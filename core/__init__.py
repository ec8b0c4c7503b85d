"""The neutral core: every shape that crosses a process or wire boundary, each defined once.

The API (`service/`), the worker and its engine (`worker/`) import it; it imports none of them, and
no web framework, database, queue or onnxruntime (tests/test_architecture.py holds it to that).

- `errors`: the `{code, message, detail}` error a broken rule raises on either side of the queue.
- `recipe`: the recipe (how to quantize) and its rules.
- `evaluation`: what the user asks of the measurement, and the operator's caps on it.
- `model`: tensor specs, ONNX graph and external-data walks, and the `ModelFacts` they give.
- `npy`, `images`, `datasets`: the `.npy` reader, image-zip specs, and dataset plans.
- `lifecycle`: the job statuses and stages; `progress`: what a running job says.
- `jobfile`: the job file and outcome between the worker and a job process.
- `result`: the job's result, built by the engine and served by the API, and its one judge of fidelity.
"""
