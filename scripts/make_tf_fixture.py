"""Write the tiny TensorFlow checkpoints that the tests read (needs real TensorFlow).

TensorFlow is not a gptforge dependency; run this from a scratch environment:

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python scripts/make_tf_fixture.py

It writes three directories under tests/fixtures/ (or under --out):

* tf_gpt2_tiny/: a random GPT-2 in exactly the layout of OpenAI's released
  checkpoints (variable names, [1, in, out] conv weights, hparams.json, the
  `checkpoint` file, model.ckpt.{index,data-00000-of-00001,meta}), saved with the
  TF1 `Saver` as OpenAI did, plus expected.npz with every variable's values.
* tf_dtypes_tiny/: one tensor of each dtype the reader supports (and a string, a
  scalar and an empty tensor), saved with the raw SaveV2 op, plus expected.npz
  (bfloat16 values stored there already widened to float32, strings as bytes).
* tf_sharded_tiny/: variables on two devices saved by a sharded Saver (two data
  files), plus a partitioned variable, plus expected.npz for the unpartitioned ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HPARAMS = {"n_vocab": 96, "n_ctx": 32, "n_embd": 12, "n_head": 3, "n_layer": 2}


def gpt2_variables(hp: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for every variable of an OpenAI GPT-2 checkpoint, keyed by TF name."""
    d, v, c = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.5, size=shape).astype(np.float32)

    # Biases and norm gains get random values too, so a mix-up of any two shows.
    values = {"model/wte": normal(v, d), "model/wpe": normal(c, d)}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}"
        values.update({
            f"{p}/ln_1/g": 1.0 + normal(d), f"{p}/ln_1/b": normal(d),
            f"{p}/attn/c_attn/w": normal(1, d, 3 * d), f"{p}/attn/c_attn/b": normal(3 * d),
            f"{p}/attn/c_proj/w": normal(1, d, d), f"{p}/attn/c_proj/b": normal(d),
            f"{p}/ln_2/g": 1.0 + normal(d), f"{p}/ln_2/b": normal(d),
            f"{p}/mlp/c_fc/w": normal(1, d, 4 * d), f"{p}/mlp/c_fc/b": normal(4 * d),
            f"{p}/mlp/c_proj/w": normal(1, 4 * d, d), f"{p}/mlp/c_proj/b": normal(d),
        })
    values["model/ln_f/g"] = 1.0 + normal(d)
    values["model/ln_f/b"] = normal(d)
    return values


def write_gpt2(out: Path, tf) -> None:
    """Save a random GPT-2 with the TF1 Saver, as OpenAI's checkpoints were made."""
    out.mkdir(parents=True, exist_ok=True)
    values = gpt2_variables(HPARAMS, np.random.default_rng(1234))
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        variables = {}
        for name, value in values.items():
            # Zero-initialised, then set by feeding the initializer (Variable.load), so
            # that the values are not baked into the graph and the .meta file stays small.
            variables[name] = tf1.get_variable(name, shape=value.shape, dtype=tf.float32,
                                               initializer=tf1.zeros_initializer())
        saver = tf1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf1.Session(graph=graph) as sess:
            for name, var in variables.items():
                var.load(values[name], sess)
            saver.save(sess, str(out / "model.ckpt"))
    (out / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")
    np.savez_compressed(out / "expected.npz", **values)


def write_dtypes(out: Path, tf) -> None:
    """Save one tensor per supported dtype with the raw SaveV2 op."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    tensors = {
        "float32": tf.constant(rng.normal(size=(2, 3)).astype(np.float32)),
        "float64": tf.constant(rng.normal(size=(3,))),
        "float16": tf.constant(rng.normal(size=(4, 2)).astype(np.float16)),
        "bfloat16": tf.cast(tf.constant(rng.normal(size=(5,)).astype(np.float32)), tf.bfloat16),
        "int8": tf.constant(np.array([-128, -1, 0, 127], dtype=np.int8)),
        "uint8": tf.constant(np.array([0, 1, 255], dtype=np.uint8)),
        "int16": tf.constant(np.array([-300, 300], dtype=np.int16)),
        "int32": tf.constant(np.arange(-3, 3, dtype=np.int32).reshape(2, 3)),
        "int64": tf.constant(np.array([-(2**40), 2**40], dtype=np.int64)),
        "bool": tf.constant(np.array([True, False, True])),
        "scalar": tf.constant(np.float32(3.25)),
        "empty": tf.zeros((0, 3), dtype=tf.float32),
        "string": tf.constant([b"hello", b"", "wörld".encode(), b"x" * 200]),
        "odd/offset": tf.constant(np.arange(3, dtype=np.float32)),  # after 1-byte types
    }
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(out / "model.ckpt"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[tensors[n] for n in names])
    (out / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                    'all_model_checkpoint_paths: "model.ckpt"\n')
    expected = {}
    for name, tensor in tensors.items():
        if tensor.dtype == tf.bfloat16:
            tensor = tf.cast(tensor, tf.float32)
        expected[name] = tensor.numpy()
    expected["string"] = np.array(list(expected["string"]), dtype=bytes)  # no pickle needed
    np.savez(out / "expected.npz", **expected)


def write_sharded(out: Path, tf) -> None:
    """Save variables on two devices with a sharded Saver: two data files, one index.

    The checkpoint also holds a partitioned variable, stored as slices.
    """
    out.mkdir(parents=True, exist_ok=True)
    tf1 = tf.compat.v1
    values = {"on_cpu0": np.arange(6, dtype=np.float32).reshape(2, 3),
              "on_cpu1": np.arange(4, dtype=np.int32)}
    graph = tf.Graph()
    with graph.as_default():
        for i, (name, value) in enumerate(values.items()):
            with tf.device(f"/cpu:{i}"):
                tf1.get_variable(name, initializer=value)
        tf1.get_variable("partitioned", shape=(4, 2), initializer=tf1.ones_initializer(),
                         partitioner=tf1.fixed_size_partitioner(2))
        saver = tf1.train.Saver(sharded=True, save_relative_paths=True)
        config = tf1.ConfigProto(device_count={"CPU": 2})
        with tf1.Session(graph=graph, config=config) as sess:
            sess.run(tf1.global_variables_initializer())
            saver.save(sess, str(out / "model.ckpt"), write_meta_graph=False)
    np.savez(out / "expected.npz", **values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    parser.add_argument("--out", type=Path, default=default, help="fixtures directory")
    args = parser.parse_args()
    import tensorflow as tf  # only this script needs TensorFlow

    # Two logical CPUs, so that a sharded Saver writes two data files.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    write_gpt2(args.out / "tf_gpt2_tiny", tf)
    write_dtypes(args.out / "tf_dtypes_tiny", tf)
    write_sharded(args.out / "tf_sharded_tiny", tf)


if __name__ == "__main__":
    main()
