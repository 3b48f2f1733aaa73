"""Small SavedModels for the serving tests: N member models and their merged model.

The members are ordinary SavedModels (a tf.Module of dense layers, two outputs) and stay the
reference: every answer the server gives for member i must equal member i's own output. The
merged model follows the NetFuse CONTRACT (signature ``serving_default`` with ``m{i}_x`` inputs
and ``m{i}_<output>`` outputs, ``assets/netfuse.json``); it is written here by hand from the
members' weights so these tests do not depend on the merge pass. When ``tfweave.netfuse.merge``
exists, ``merge_members`` uses it and the hand-written one is kept as the contract check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

IN_DIM, HIDDEN, OUT_DIM = 6, 16, 3
REPO = Path(__file__).resolve().parents[2]


def write_text(path: Path, text: str) -> str:
    """Writes a config file for a test and returns its path as the server's flags want it."""
    path.write_text(text, encoding="utf-8")
    return str(path)


def _member_module(weights):
    import tensorflow as tf

    class Member(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = [tf.Variable(w, name=f"w{i}") for i, (w, _) in enumerate(weights)]
            self.b = [tf.Variable(b, name=f"b{i}") for i, (_, b) in enumerate(weights)]

        @tf.function(input_signature=[tf.TensorSpec([None, IN_DIM], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for i, (w, b) in enumerate(zip(self.w, self.b)):
                h = tf.matmul(h, w) + b
                if i < len(self.w) - 1:
                    h = tf.nn.relu(h)
            return {"logits": h, "probs": tf.nn.softmax(h)}

    return Member()


def member_weights(seed: int, layers: int = 2):
    rng = np.random.default_rng(seed)
    dims = [IN_DIM] + [HIDDEN] * (layers - 1) + [OUT_DIM]
    return [(rng.standard_normal((dims[i], dims[i + 1])).astype(np.float32) * 0.5,
             rng.standard_normal(dims[i + 1]).astype(np.float32) * 0.1)
            for i in range(layers)]


def write_member(path: str, weights) -> str:
    import tensorflow as tf

    module = _member_module(weights)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def write_handmade_merged(path: str, all_weights, names, sources) -> str:
    """A merged SavedModel per the CONTRACT, built directly from stacked weights."""
    import tensorflow as tf

    n = len(all_weights)
    layers = len(all_weights[0])

    class Merged(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = [tf.Variable(np.stack([all_weights[m][l][0] for m in range(n)]))
                      for l in range(layers)]
            self.b = [tf.Variable(np.stack([all_weights[m][l][1] for m in range(n)]))
                      for l in range(layers)]

        @tf.function(input_signature=[tf.TensorSpec([None, IN_DIM], tf.float32, name=f"m{i}_x")
                                      for i in range(n)])
        def serve(self, *xs):
            outputs = {}
            for m, x in enumerate(xs):
                h = x
                for l in range(layers):
                    h = tf.matmul(h, self.w[l][m]) + self.b[l][m]
                    if l < layers - 1:
                        h = tf.nn.relu(h)
                outputs[f"m{m}_logits"] = h
                outputs[f"m{m}_probs"] = tf.nn.softmax(h)
            return outputs

    module = Merged()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    tensor = {"dtype": "float32", "shape": [-1, IN_DIM]}
    out = {"dtype": "float32", "shape": [-1, OUT_DIM]}
    metadata = {"format": 1,
                "members": [{"name": nm, "source": src, "index": i}
                            for i, (nm, src) in enumerate(zip(names, sources))],
                "inputs": {"x": tensor}, "outputs": {"logits": out, "probs": out}}
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "netfuse.json"), "w") as f:
        json.dump(metadata, f)
    return path


def write_handmade_stacked(path: str, all_weights, names, sources) -> str:
    """The stacked form (``netfuse.merge(..., stacked=True)``): ``serving_default`` takes one
    ``[N, B, IN_DIM]`` tensor ``x`` and returns ``[N, B, ...]`` outputs; the model axis is
    carried through BatchMatMulV2 with stacked weights, as the merge pass lifts MatMul."""
    import tensorflow as tf

    n = len(all_weights)
    layers = len(all_weights[0])

    class Stacked(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = [tf.Variable(np.stack([all_weights[m][l][0] for m in range(n)]))
                      for l in range(layers)]
            self.b = [tf.Variable(np.stack([all_weights[m][l][1] for m in range(n)])[:, None])
                      for l in range(layers)]

        @tf.function(input_signature=[tf.TensorSpec([n, None, IN_DIM], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for l in range(layers):
                h = tf.matmul(h, self.w[l]) + self.b[l]
                if l < layers - 1:
                    h = tf.nn.relu(h)
            return {"logits": h, "probs": tf.nn.softmax(h)}

    module = Stacked()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    metadata = {"format": 1, "stacked": True,
                "members": [{"name": nm, "source": src, "index": i}
                            for i, (nm, src) in enumerate(zip(names, sources))]}
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "netfuse.json"), "w") as f:
        json.dump(metadata, f)
    return path


def build_model_zoo(root: str, n: int = 3, seed: int = 0) -> dict:
    """Writes the members (ordinary models in version dirs) and merged models of them.

    ``merged``: made by ``tfweave.netfuse.merge`` (the real merge pass), members named
    ``member{i}``. ``contract_merged`` and ``stacked_merged``: written by hand from the CONTRACT,
    so the server is checked against the contract itself as well as against what the merge pass
    emits.
    """
    from tfweave import netfuse

    names = [f"member{i}" for i in range(n)]
    weights = [member_weights(seed + i) for i in range(n)]
    members = {}
    for name, w in zip(names, weights):
        members[name] = os.path.join(root, "members", name)
        write_member(os.path.join(members[name], "1"), w)
    sources = [os.path.join(members[nm], "1") for nm in names]
    merged = os.path.join(root, "merged")
    netfuse.merge(sources, os.path.join(merged, "1"), names=names)
    contract = os.path.join(root, "contract_merged")
    contract_names = [f"contract{i}" for i in range(n)]
    write_handmade_merged(os.path.join(contract, "1"), weights, contract_names, sources)
    stacked = os.path.join(root, "stacked_merged")
    stacked_names = [f"stacked{i}" for i in range(n)]
    write_handmade_stacked(os.path.join(stacked, "1"), weights, stacked_names, sources)
    references = dict(members)
    references.update({c: members[m] for c, m in zip(contract_names, names)})
    references.update({c: members[m] for c, m in zip(stacked_names, names)})
    return {"names": names, "weights": weights, "members": members, "merged": merged,
            "contract_merged": contract, "contract_names": contract_names,
            "stacked_merged": stacked, "stacked_names": stacked_names,
            "references": references}


class MemberReference:
    """Each member SavedModel loaded on its own (tf.saved_model.load): the expected answers."""

    def __init__(self, member_dirs: dict[str, str]):
        self._dirs = member_dirs
        self._loaded = {}

    def __call__(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        import tensorflow as tf

        if name not in self._loaded:
            versions = sorted(int(v) for v in os.listdir(self._dirs[name]) if v.isdigit())
            self._loaded[name] = tf.saved_model.load(
                os.path.join(self._dirs[name], str(versions[-1])))
        fn = self._loaded[name].signatures["serving_default"]
        return {k: v.numpy() for k, v in fn(x=tf.constant(x, tf.float32)).items()}
