"""Reading Keras models into plans."""

import keras
import pytest

from mtz_tf import graph, models


def test_plan_of_lenet():
    plan = graph.read_plan(models.lenet_300_100())
    assert [u.name for u in plan.units] == ["fc1", "fc2", "fc3"]
    assert [u.activation for u in plan.units] == ["relu", "relu", "linear"]
    assert plan.input_shape == (28, 28, 1)


def test_activation_layers_fold_into_dense_and_dropout_is_kept():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
            keras.layers.Activation("softmax"),
        ]
    )
    plan = graph.read_plan(model)
    assert [u.activation for u in plan.units] == ["relu", "softmax"]
    kinds = [s.kind if isinstance(s, graph.PassThrough) else "Dense" for s in plan.steps]
    assert kinds == ["Dense", "Dropout", "Dense"]


def test_unsupported_layers_are_named():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.DepthwiseConv2D(3, name="myconv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="'myconv' of type DepthwiseConv2D is not supported"):
        graph.read_plan(model)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, activation="softmax", name="h"),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="'h' uses activation 'softmax'"):
        graph.read_plan(model)
    with pytest.raises(ValueError, match="at least one hidden Dense"):
        graph.read_plan(keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]))


def test_output_must_come_from_the_last_unit():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3)(inputs)
    b = keras.layers.Dense(3)(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="sum")([a, b]))
    with pytest.raises(ValueError, match="must come from its last Dense or Conv2D"):
        graph.read_plan(model)


def test_coupled_groups_of_resnet20():
    plan = graph.read_plan(models.resnet20((28, 28, 1), 10, 0.5))
    assert not plan.is_chain and len(plan.units) == 22
    groups = [sorted(g.members) for g in plan.coupled_groups]
    stage1 = ["stem_conv"] + [f"stage1_block{b}_conv2" for b in (1, 2, 3)]
    assert groups[0] == sorted((name, 0, 8) for name in stage1)
    for stage, width in ((2, 16), (3, 32)):
        names = [f"stage{stage}_block1_proj_conv"] + [
            f"stage{stage}_block{b}_conv2" for b in (1, 2, 3)
        ]
        assert groups[stage - 1] == sorted((name, 0, width) for name in names)
    assert len(groups) == 3
    # Every other hidden unit (the blocks' first convs) is a group of its own.
    zip_groups = plan.zip_groups()
    assert sum(len(g) == 1 for g in zip_groups) == 9 and len(zip_groups) == 12


def test_coupled_groups_through_concatenate():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(inputs)
    c = keras.layers.Conv2D(2, 3, padding="same", name="c")(inputs)
    joined = keras.layers.Concatenate(name="cat")([a, b])
    s = keras.layers.Conv2D(8, 1, name="s")(inputs)
    x = keras.layers.ReLU(name="relu")(keras.layers.Add(name="add")([joined, s]))
    x = keras.layers.Concatenate(name="cat2")([x, c])  # c is concatenated, not coupled
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    plan = graph.read_plan(keras.Model(inputs, keras.layers.Dense(3, name="fc")(x)))
    assert [g.members for g in plan.coupled_groups] == [
        (("a", 0, 4), ("s", 0, 4)),
        (("b", 0, 4), ("s", 4, 8)),
    ]
    cat2 = next(i for i, step in enumerate(plan.steps) if step.name == "cat2")
    index = {unit.name: i for i, unit in enumerate(plan.units)}
    # Channels of cat2: a's, b's (through the Add), then c's.
    assert plan.unit_sources(cat2) == [(index["a"], 0, 4), (index["b"], 0, 4), (index["c"], 0, 2)]
