"""One frozen product at a time: fp32 against the ways ONNX Runtime can multiply by a blocked int4 matrix.

    python scripts/bench_quantized_products.py --rows 256 --threads 2

For each of the 0.5B shape's matrix shapes (MLP up / down, attention q), times the forward product x @ W^T
and the backward's dy @ W in fp32 (MLAS sgemm), MatMulNBits at accuracy levels 0 (fp32, exact) and 4 (int8
activations), a blocked DequantizeLinear followed by dy @ W (what the training graphs run), and the
dequantization alone, int4 and int8, and int8 as Cast + Mul by the scales. Constant folding is off, so
nothing is dequantized at load time. Prints the CPU, the onnxruntime version and the median milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from bench import cpu_description
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"mlp up [4864, 896]": (4864, 896), "mlp down [896, 4864]": (896, 4864), "q [896, 896]": (896, 896)}


def model(nodes, inputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "product", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 10  # onnxruntime-training 1.19.2 reads up to IR 10
    return proto.SerializeToString()


def median_ms(proto: bytes, feeds: dict, threads: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["ConstantFolding"])
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cases(out: int, inner: int, rows: int, block: int):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, inner)).astype(np.float32)
    scale = (np.abs(w.reshape(out, inner // block, block)).max(axis=2) / 7).astype(np.float32)
    q = np.clip(np.rint(w.reshape(out, inner // block, block) / scale[:, :, None]), -8, 7).astype(np.int8) + 8
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    uint4 = helper.make_tensor("Q", TensorProto.UINT4, [out, inner], q.reshape(-1).astype(np.uint8).tolist())
    zero = helper.make_tensor("Z", TensorProto.UINT4, [out, inner // block], [8] * (out * inner // block))
    int8 = numpy_helper.from_array(rng.integers(-127, 128, (out, inner)).astype(np.int8), "Q")
    x = {"x": rng.standard_normal((rows, inner)).astype(np.float32)}
    dy = {"dy": rng.standard_normal((rows, out)).astype(np.float32)}
    scales = {"S": scale}
    x_in = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])]
    dy_in = [helper.make_tensor_value_info("dy", TensorProto.FLOAT, [rows, out])]
    s_in = [helper.make_tensor_value_info("S", TensorProto.FLOAT, [out, inner // block])]  # an input: never folded
    weight = numpy_helper.from_array(w, "W")
    shapes = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("blocks", [out, inner // block, block]), ("column", [out, inner // block, 1]), ("matrix", [out, inner]))]

    yield "fp32 x @ W^T", model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], x_in, [weight]), x
    yield "fp32 dy @ W", model([helper.make_node("MatMul", ["dy", "W"], ["y"])], dy_in, [weight]), dy
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "P", "S"], ["y"], domain="com.microsoft", K=inner, N=out,
                                bits=4, block_size=block, accuracy_level=level)
        yield f"MatMulNBits x @ W^T, level {level}", model([node], x_in + s_in, [numpy_helper.from_array(packed, "P")]), x | scales
    dequantize = helper.make_node("DequantizeLinear", ["Q", "S", "Z"], ["W"], axis=1, block_size=block)
    yield "int4 DequantizeLinear + dy @ W", model([dequantize, helper.make_node("MatMul", ["dy", "W"], ["y"])],
                                                   dy_in + s_in, [uint4, zero]), dy | scales
    yield "int4 DequantizeLinear alone", model([helper.make_node("DequantizeLinear", ["Q", "S", "Z"], ["y"], axis=1,
                                                                  block_size=block)], s_in, [uint4, zero]), scales
    yield "int8 DequantizeLinear alone", model([helper.make_node("DequantizeLinear", ["Q", "S"], ["y"], axis=1,
                                                                  block_size=block)], s_in, [int8]), scales
    cast_mul = [helper.make_node("Cast", ["Q"], ["qf"], to=TensorProto.FLOAT),
                helper.make_node("Reshape", ["qf", "blocks"], ["q3"]),
                helper.make_node("Reshape", ["S", "column"], ["s3"]),
                helper.make_node("Mul", ["q3", "s3"], ["w3"]),
                helper.make_node("Reshape", ["w3", "matrix"], ["y"])]
    yield "int8 Cast + Mul alone", model(cast_mul, s_in, [int8, *shapes]), scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="rows of x and dy: batch x sequence (default 2 x 128)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{cpu_description()}; onnxruntime {ort.__version__}, onnx {onnx.__version__}; {args.rows} rows, "
          f"blocks of {args.block_size}, {args.threads} threads, median of {args.repeats} (ms)")
    columns = {label: {name: median_ms(proto, feeds, args.threads, args.repeats)
                       for name, proto, feeds in cases(out, inner, args.rows, args.block_size)}
               for label, (out, inner) in SHAPES.items()}
    print(f"{'product':<38}" + "".join(f"{label:>22}" for label in columns))
    for name in next(iter(columns.values())):
        print(f"{name:<38}" + "".join(f"{column[name]:>22.2f}" for column in columns.values()))

if __name__ == "__main__":
    main()
