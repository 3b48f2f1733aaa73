"""The merged SavedModel's on-disk contract, checked with the loaders TF Serving uses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match, member_outputs

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _export(models, tmp_path):
    paths = []
    for i, model in enumerate(models):
        path = str(tmp_path / f"member{i}" / "1")
        model.export(path, verbose=False)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cnn_members(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn")
    models = [arch.perturb(arch.resnext_cnn(s, image=8, width=8, cardinality=2, blocks=1,
                                            classes=3), s) for s in range(3)]
    paths = _export(models, tmp)
    merged = netfuse.merge(paths, str(tmp / "merged" / "1"))
    return models, paths, merged


def test_merged_saved_model_has_prefixed_signature_and_member_metadata(cnn_members):
    _, paths, merged = cnn_members
    meta = json.loads(open(os.path.join(merged.path, "assets", "netfuse.json")).read())
    assert meta["format"] == 1
    assert [m["index"] for m in meta["members"]] == [0, 1, 2]
    assert [m["name"] for m in meta["members"]] == ["member0", "member1", "member2"]
    assert [m["source"] for m in meta["members"]] == paths
    assert meta["inputs"] == {"image": {"dtype": "float32", "shape": [None, 8, 8, 3]}}
    assert meta["outputs"] == {"output_0": {"dtype": "float32", "shape": [None, 3]}}
    import tensorflow as tf
    loaded = tf.saved_model.load(merged.path)
    signature = loaded.signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["m0_image", "m1_image",
                                                               "m2_image"]
    assert sorted(signature.structured_outputs) == ["m0_output_0", "m1_output_0",
                                                    "m2_output_0"]
    stacked = loaded.signatures["stacked"].structured_input_signature[1]["image"]
    assert stacked.shape.as_list() == [3, None, 8, 8, 3]


def test_tf1_session_loader_runs_the_signature_as_tf_serving_would(cnn_members, rng):
    import tensorflow as tf
    models, _, merged = cnn_members
    inputs = [{"image": rng.normal(size=(b, 8, 8, 3)).astype("float32")} for b in (1, 4, 2)]
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], merged.path)
        signature = meta_graph.signature_def["serving_default"]
        graph = session.graph
        feeds = {graph.get_tensor_by_name(signature.inputs[f"m{i}_image"].name):
                 inputs[i]["image"] for i in range(3)}
        fetches = {key: graph.get_tensor_by_name(info.name)
                   for key, info in signature.outputs.items()}
        results = session.run(fetches, feeds)
        graph_def = graph.as_graph_def()
    per_member = {i: {"output_0": results[f"m{i}_output_0"]} for i in range(3)}
    assert_members_match(models, per_member, inputs)
    # stock ops only, and never a loop
    ops = {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function
                                           for n in f.node_def}
    assert not ops & {"While", "StatelessWhile", "For"}
    assert "Conv2D" in ops


@pytest.mark.slow
def test_saved_model_cli_show_and_run(cnn_members, tmp_path):
    models, _, merged = cnn_members
    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", merged.path, "--tag_set", "serve",
                            "--signature_def", "serving_default"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    for i in range(3):
        assert f"inputs['m{i}_image']" in shown.stdout
        assert f"outputs['m{i}_output_0']" in shown.stdout
    images = [np.full((1, 8, 8, 3), 0.1 * (i + 1), "float32") for i in range(3)]
    for i, image in enumerate(images):
        np.save(tmp_path / f"x{i}.npy", image)
    feeds = ";".join(f"m{i}_image={tmp_path / f'x{i}.npy'}" for i in range(3))
    out_dir = tmp_path / "cli_out"
    ran = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", merged.path, "--tag_set", "serve",
                          "--signature_def", "serving_default", "--inputs", feeds,
                          "--outdir", str(out_dir)], capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    for i in range(3):
        got = np.load(out_dir / f"m{i}_output_0.npy")
        np.testing.assert_allclose(got, member_outputs(models[i], {"image": images[i]})[0],
                                   atol=1e-4)


def test_load_merged_runs_any_subset_with_its_own_batch_sizes(cnn_members, rng):
    models, _, merged = cnn_members
    loaded = netfuse.load_merged(merged.path)
    assert loaded.members == ["member0", "member1", "member2"]
    inputs = {2: {"image": rng.normal(size=(5, 8, 8, 3)).astype("float32")},
              0: {"image": rng.normal(size=(1, 8, 8, 3)).astype("float32")}}
    results = loaded.run({"member2": inputs[2], 0: inputs[0]})
    assert set(results) == {"member2", 0}
    assert_members_match(models, {2: results["member2"], 0: results[0]},
                         [inputs.get(i) for i in range(3)])


@pytest.mark.slow
def test_merged_model_runs_with_onednn_off(cnn_members, rng):
    """Grouped convolutions must not be fused by Grappler's remapper into a kernel CPU lacks."""
    models, _, merged = cnn_members
    image = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    np.save(merged.path + "_probe.npy", image)
    code = (
        "import numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({merged.path!r})\n"
        f"x = tf.constant(np.load({merged.path + '_probe.npy'!r}))\n"
        "out = m.signatures['serving_default'](m0_image=x, m1_image=x, m2_image=x)\n"
        f"np.save({merged.path + '_out.npy'!r}, out['m1_output_0'].numpy())\n")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    got = np.load(merged.path + "_out.npy")
    np.testing.assert_allclose(got, member_outputs(models[1], {"image": image})[0], atol=1e-4)


def test_merge_accepts_tf_keras_saved_models_with_fused_batch_norm(tmp_path, rng):
    """tf_keras `save` SavedModels: FusedBatchNormV3 (inference) in a CNN, and the tf_keras
    LayerNormalization (FusedBatchNormV3 in training mode over a reshaped input)."""
    import tf_keras

    def build(seed):
        tf_keras.utils.set_random_seed(seed)
        inputs = tf_keras.Input((6, 6, 2), name="image")
        x = tf_keras.layers.Conv2D(4, 3, padding="same")(inputs)
        x = tf_keras.layers.BatchNormalization()(x)
        x = tf_keras.layers.Activation("relu")(x)
        x = tf_keras.layers.Reshape((9, 4))(tf_keras.layers.MaxPooling2D()(x))
        x = tf_keras.layers.LayerNormalization()(x)
        outputs = tf_keras.layers.Dense(3, name="logits")(x)
        model = tf_keras.Model(inputs, outputs)
        for w in model.weights:
            noise = np.random.default_rng(seed).normal(0, 0.1, w.shape).astype("float32")
            w.assign(np.abs(w.numpy() + noise) + 0.1 if "variance" in w.name
                     else w.numpy() + noise)
        return model

    models = [build(s) for s in range(2)]
    paths = []
    for i, model in enumerate(models):
        path = str(tmp_path / f"tfk{i}")
        model.save(path, save_format="tf")
        paths.append(path)
    merged = netfuse.merge(paths)
    images = [rng.normal(size=(b, 6, 6, 2)).astype("float32") for b in (2, 1)]
    results = merged.run({i: {"image": images[i]} for i in range(2)})
    for i, model in enumerate(models):
        (key,) = results[i]
        np.testing.assert_allclose(results[i][key], model(images[i], training=False).numpy(),
                                   atol=1e-4)


def _tf_keras_paths(tmp_path, heads):
    """tf_keras `save`s of models built in one process: their signatures name each output after
    its layer, which tf_keras numbers per process (dense, dense_1, ...)."""
    import tf_keras
    models, paths = [], []
    for seed in range(2):
        tf_keras.utils.set_random_seed(seed)
        inputs = tf_keras.Input((5,), name="features")
        hidden = tf_keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
        outputs = [tf_keras.layers.Dense(3)(hidden) for _ in range(heads)]
        model = tf_keras.Model(inputs, outputs)
        path = str(tmp_path / f"tfk{seed}")
        model.save(path, save_format="tf")
        models.append(model)
        paths.append(path)
    return models, paths


def test_tf_keras_single_outputs_named_by_their_layer_counter_pair_up(tmp_path, rng):
    models, paths = _tf_keras_paths(tmp_path, heads=1)
    merged = netfuse.merge(paths)
    features = [rng.normal(size=(b, 5)).astype("float32") for b in (2, 1)]
    results = merged.run({i: {"features": features[i]} for i in range(2)})
    for i, model in enumerate(models):
        (key,) = results[i]
        np.testing.assert_allclose(results[i][key], model(features[i], training=False).numpy(),
                                   atol=1e-4)


def test_tf_keras_outputs_named_by_their_layer_counter_are_refused_with_what_to_do(tmp_path):
    # two heads of one shape: pairing them by name order could swap them silently
    _, paths = _tf_keras_paths(tmp_path, heads=2)
    with pytest.raises(netfuse.NotIsomorphicError, match="name the output layers"):
        netfuse.merge(paths)


def _named_mlp(seed, name):
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="features")
    return keras.Model(x, keras.layers.Dense(2)(x), name=name)


def test_default_member_names_are_made_unique_without_taking_another_members_name(rng):
    models = [_named_mlp(seed, name) for seed, name in enumerate(["a", "a", "a_1"])]
    merged = netfuse.merge(models)
    assert len(set(merged.members)) == 3
    assert merged.members[0] == "a" and merged.members[2] == "a_1"
    inputs = [{"features": rng.normal(size=(2, 4)).astype("float32")} for _ in models]
    results = merged.run(dict(zip(merged.members, inputs)))
    assert_members_match(models, {i: results[name] for i, name in enumerate(merged.members)},
                         inputs)


def test_merge_refuses_duplicate_explicit_member_names():
    models = [_named_mlp(seed, f"m{seed}") for seed in range(2)]
    with pytest.raises(netfuse.MergeError, match="'x' given more than once"):
        netfuse.merge(models, names=["x", "x"])


def test_merge_given_one_path_instead_of_a_list_asks_for_a_list(tmp_path):
    with pytest.raises(netfuse.MergeError, match=r"list of models, not one path.*\['"):
        netfuse.merge(str(tmp_path / "ft_a"))


def test_merge_refuses_a_lookup_table_naming_the_op_that_reads_it(tmp_path):
    import keras
    paths = []
    for seed, vocabulary in enumerate([["a", "b", "c"], ["c", "b", "a"]]):
        keras.utils.set_random_seed(seed)
        words = keras.Input((3,), dtype="string", name="words")
        ids = keras.layers.StringLookup(vocabulary=vocabulary)(words)
        model = keras.Model(words, keras.layers.Embedding(5, 2)(ids))
        paths.append(_export([model], tmp_path / f"lookup{seed}")[0])
    with pytest.raises(netfuse.MergeError, match=r"string_lookup.*LookupTableFindV2.*"
                                                 r"lookup table.*outside the model"):
        netfuse.merge(paths)


def test_merge_refuses_bad_names_and_conv_strategies_before_freezing_anything(tmp_path):
    missing = [str(tmp_path / "not_frozen_yet")] * 2   # freezing them would fail differently
    with pytest.raises(netfuse.MergeError, match="conv_strategy 'fast' is not available"):
        netfuse.merge(missing, conv_strategy="fast")
    for names in (["a", 3], ["a", ""]):
        with pytest.raises(netfuse.MergeError, match="member names must be non-empty strings"):
            netfuse.merge(missing, names=names)
