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
            keras.layers.Conv2D(4, 3),
            keras.layers.SeparableConv2D(4, 3, name="myconv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="'myconv' of type SeparableConv2D is not supported"):
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
    assert len(plan.units) == 22
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


def _padded_relu6_model():
    """ZeroPadding2D, Rescaling, ReLU(6), Cropping2D, UpSampling2D and an Add: a small
    model with every layer ResNet50/MobileNet put between their convolutions."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(inputs)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="c1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="relu6")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.ReLU(6.0, name="post_add")(x)
    x = keras.layers.Cropping2D(1, name="crop")(x)
    x = keras.layers.UpSampling2D(2, name="up")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="small")


def test_padding_cropping_upsampling_rescaling_and_relu6_are_read():
    plan = graph.read_plan(_padded_relu6_model())
    kinds = [(s.name, type(s).__name__, s.kind) for s in plan.steps]
    assert kinds == [
        ("scale", "PassThrough", "Rescaling"),
        ("pad", "PassThrough", "ZeroPadding2D"),
        ("c1", "Unit", "Conv2D"),
        ("c2", "Unit", "Conv2D"),
        ("add", "Merge", "Add"),
        ("post_add", "PassThrough", "Activation"),
        ("crop", "PassThrough", "Cropping2D"),
        ("up", "PassThrough", "UpSampling2D"),
        ("gap", "PassThrough", "GlobalAveragePooling2D"),
        ("head", "Unit", "Dense"),
    ]
    assert plan.units[0].activation == "relu6" and plan.units[0].batch_norm == "bn1"
    assert plan.coupled_groups[0].units == ("c1", "c2")


@pytest.mark.parametrize(
    "layer, message",
    [
        (keras.layers.ReLU(max_value=4.0, name="r"), r"'r' is a ReLU with max_value=4.0"),
        (keras.layers.ReLU(negative_slope=0.1, name="r"), "negative_slope=0.1"),
        (keras.layers.Rescaling([1.0, 2.0, 3.0], name="s"), "'s' has a per-channel scale"),
        (keras.layers.ZeroPadding2D(1, data_format="channels_first", name="p"), "channels_last"),
    ],
)
def test_layers_that_do_not_commute_with_a_permutation_are_refused(layer, message):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(3, 1, name="c")(inputs)
    x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 1, name="c2")(x))
    with pytest.raises(ValueError, match=message):
        graph.read_plan(keras.Model(inputs, keras.layers.Dense(2)(x)))


def test_describe_lists_units_streams_and_the_head():
    lines = []
    assert graph.describe(_padded_relu6_model(), print_fn=lines.append)
    text = "\n".join(lines)
    assert lines[0] == "Model 'small': 2 hidden units zippable, input shape (8, 8, 3)"
    rows = {line.split()[1]: line.split() for line in lines[2:5]}
    assert rows["c1"][2:8] == ["Conv2D", "4", "bn1", "relu6", "model", "input"]
    assert rows["c2"][-2:] == ["c1", "s1"] and rows["head"][-1] == "head"
    assert "  s1: 2 units (c1, c2), coupled by add" in lines
    assert text.endswith("Output head (never zipped): head")


def test_describe_says_why_a_model_is_refused():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.DepthwiseConv2D(3, name="dw"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    lines = []
    assert not graph.describe(model, print_fn=lines.append)
    assert lines[0].startswith(
        f"Model {model.name!r} cannot be zipped: DepthwiseConv2D layer 'dw' reads the model input"
    )
