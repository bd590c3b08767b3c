#!/usr/bin/env python3
"""ONNX Runtime scoring the notebook's network: the yardstick `fraudstream bench` is compared with.

The same architecture as fraudstream's default model (30 features, window 30, 312,833
parameters): BiLSTM(128, sequences) -> softmax(q.k^T).v over 64-d projections -> concat ->
LSTM(64, last state) -> dense 32 relu -> dense 1 sigmoid, built with ONNX's own LSTM operator
(what tf2onnx makes of the Keras notebook) and random weights (speed does not depend on them).
It prints the windows/s ONNX Runtime reaches at each batch size with the given threads, as JSON,
so the ratio to `fraudstream bench --inference-only` can be measured on the same machine, in
alternating runs:

    pip install onnx==1.23.2 onnxruntime==1.32.0
    python3 benches/onnx_reference.py --threads 2 --seconds 2
    fraudstream bench --inference-only --json --seconds 2
"""

import argparse
import json
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort

FEATURES, WINDOW, HIDDEN, HEAD, HIDDEN2, DENSE = 30, 30, 128, 64, 64, 32


def network(seed: int = 7) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = []

    def weight(name, *shape):
        scale = 1.0 / np.sqrt(shape[-1] if len(shape) == 1 else shape[-2])
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name, values):
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    # ONNX LSTM weights: W [dirs, 4H, in], R [dirs, 4H, H], B [dirs, 8H] (Keras' single bias
    # is the first half; the second half stays zero, as tf2onnx exports it).
    def lstm_bias(name, dirs, hidden):
        b = np.zeros((dirs, 8 * hidden), dtype=np.float32)
        b[:, : 4 * hidden] = rng.standard_normal((dirs, 4 * hidden)) * 0.1
        inits.append(numpy_helper.from_array(b, name))
        return name

    nodes = [
        # [B, T, F] -> [T, B, F] (ONNX LSTM's default layout)
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM",
            ["xt", weight("w1", 2, 4 * HIDDEN, FEATURES), weight("r1", 2, 4 * HIDDEN, HIDDEN),
             lstm_bias("b1", 2, HIDDEN)],
            ["y1"], hidden_size=HIDDEN, direction="bidirectional"),
        # y1 [T, 2, B, H] -> [B, T, 2, H] -> [B, T, 2H]
        helper.make_node("Transpose", ["y1"], ["y1t"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["y1t", const("seq_shape", [0, 0, 2 * HIDDEN])], ["seq"]),
    ]
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["seq", weight(f"w{p}", 2 * HIDDEN, HEAD)], [f"{p}0"]),
            helper.make_node("Add", [f"{p}0", weight(f"b{p}", HEAD)], [p]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["context"]),
        helper.make_node("Concat", ["seq", "context"], ["joined"], axis=-1),
        helper.make_node("Transpose", ["joined"], ["joinedt"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM",
            ["joinedt", weight("w2", 1, 4 * HIDDEN2, 2 * HIDDEN + HEAD),
             weight("r2", 1, 4 * HIDDEN2, HIDDEN2), lstm_bias("b2", 1, HIDDEN2)],
            ["", "h2"], hidden_size=HIDDEN2),
        helper.make_node("Reshape", ["h2", const("last_shape", [-1, HIDDEN2])], ["last"]),
        helper.make_node("Gemm", ["last", weight("wd", HIDDEN2, DENSE), weight("bd", DENSE)],
                         ["d0"]),
        helper.make_node("Relu", ["d0"], ["d"]),
        helper.make_node("Gemm", ["d", weight("wo", DENSE, 1), weight("bo", 1)], ["o0"]),
        helper.make_node("Sigmoid", ["o0"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "attention_lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WINDOW, FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def parameters(model: onnx.ModelProto) -> int:
    """Keras' count: the LSTMs' second (zero) bias halves are not parameters there."""
    total = 0
    for t in model.graph.initializer:
        if t.name in ("seq_shape", "last_shape"):
            continue
        n = int(np.prod(t.dims))
        total += n // 2 if t.name in ("b1", "b2") else n
    return total


def rate(session: ort.InferenceSession, batch: int, seconds: float, rng) -> float:
    x = rng.standard_normal((batch, WINDOW, FEATURES)).astype(np.float32)
    session.run(None, {"x": x})  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"x": x})
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per batch size")
    parser.add_argument("--batches", default="1,32,256", help="batch sizes, comma-separated")
    args = parser.parse_args()

    model = network()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    out = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "parameters": parameters(model),
        "windows_per_second": {
            b: round(rate(session, int(b), args.seconds, rng), 1)
            for b in args.batches.split(",")
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
