"""The merge refuses members that differ in more than their weights, saying where."""

import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch


def _refusal(models) -> netfuse.NotIsomorphicError:
    with pytest.raises(netfuse.NotIsomorphicError) as caught:
        netfuse.merge(models)
    return caught.value


def test_merge_refuses_models_with_different_layer_count():
    error = _refusal([arch.mlp(0, features=6, hidden=(8,)), arch.mlp(1, features=6,
                                                                      hidden=(8, 8))])
    # walking back from the outputs, model 0 reaches its input where model 1 has one more layer
    text = str(error)
    assert "op Placeholder vs Relu" in text
    assert "weight shape [6, 8] vs [8, 8]" in text
    assert "model 1" in text


def test_merge_refuses_different_units_naming_node_and_weight_shape():
    error = _refusal([arch.mlp(0, features=6, hidden=(8,)), arch.mlp(1, features=6,
                                                                      hidden=(9,))])
    text = str(error)
    assert "weight shape [6, 8] vs [6, 9]" in text
    assert "MatMul" in text  # the node that reads the kernel is named


def test_merge_refuses_different_activation_naming_the_ops():
    import keras

    def build(activation):
        inputs = keras.Input((4,), name="features")
        return keras.Model(inputs, keras.layers.Dense(3, activation=activation)(inputs))
    error = _refusal([build("relu"), build("tanh")])
    assert "op Relu vs Tanh" in str(error)


def test_merge_refuses_different_conv_strides_naming_the_attribute():
    import keras

    def build(strides):
        inputs = keras.Input((8, 8, 3), name="image")
        x = keras.layers.Conv2D(4, 3, strides=strides)(inputs)
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    error = _refusal([build(1), build(2)])
    problem = next(d for d in error.differences if "strides" in d)
    assert "(Conv2D)" in problem and "attribute 'strides'" in problem


def test_merge_refuses_members_with_different_signature_inputs():
    import keras

    def build(name):
        inputs = keras.Input((4,), name=name)
        return keras.Model(inputs, keras.layers.Dense(2)(inputs))
    error = _refusal([build("features"), build("pixels")])
    assert "signature inputs ['features'] in model 0 vs ['pixels']" in str(error)


def test_identical_rnn_models_are_refused_for_their_while_loop_not_as_different_architectures():
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4, 2), name="features")
        return keras.Model(x, keras.layers.Dense(2)(keras.layers.GRU(3)(x)))

    # the loops' frame names differ as the layer names do (gru_1/while vs gru_1_1/while)
    with pytest.raises(netfuse.UnsupportedOpError, match="while loop") as refusal:
        netfuse.merge([member(0), member(1)])
    assert not isinstance(refusal.value, netfuse.NotIsomorphicError)
    assert "GRU" in str(refusal.value) and "unroll=True" in str(refusal.value)


def _dense_member(seed, input_name=None):
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,), name=input_name)
    return keras.Model(x, keras.layers.Dense(2)(x))


def test_exports_with_keras_generated_input_names_pair_by_position(tmp_path, rng):
    import numpy as np
    from tests.netfuse.parity import assert_members_match
    models = [_dense_member(seed) for seed in range(2)]
    paths = []
    for index, model in enumerate(models):
        paths.append(str(tmp_path / f"m{index}" / "1"))
        model.export(paths[-1], verbose=False)
    merged = netfuse.merge(paths)
    (name,) = merged.input_specs  # member 0's name (keras_tensor...); member 1's differs
    inputs = [{name: rng.normal(size=(b, 3)).astype(np.float32)} for b in (2, 1)]
    results = merged.run(dict(enumerate(inputs)))
    own = [{models[i].inputs[0].name: inputs[i][name]} for i in range(2)]
    assert_members_match(models, results, own)


def test_a_generated_input_name_against_a_given_one_hints_at_naming_the_inputs(tmp_path):
    paths = []
    for index, model in enumerate([_dense_member(0), _dense_member(1, "features")]):
        paths.append(str(tmp_path / f"m{index}" / "1"))
        model.export(paths[-1], verbose=False)
    with pytest.raises(netfuse.NotIsomorphicError, match=r"name the keras\.Input layers"):
        netfuse.merge(paths)
