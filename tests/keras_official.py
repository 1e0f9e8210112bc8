"""The official PFANet network rebuilt in tf_keras (Keras 2), layer for layer as PFANET.md describes the authors'
model.py, attention.py and bilinear_upsampling.py, for the fidelity test. Needs TensorFlow and tf_keras; the same
code builds it in Keras 3 (`build_official(keras=keras)`, the `keras` package 3.x with the TensorFlow backend), to
check the files Keras 3 writes.

Only the parts that shape the weights file and the forward pass are reproduced: layer names, the BatchNorm subclass
that always runs in training mode, BilinearUpsampling with align_corners=True, the two unnamed Dense layers and
the Repeat (tile) layers of the attention modules.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import tensorflow as tf
import tf_keras

VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


@functools.cache
def official_layers(keras) -> types.SimpleNamespace:
    """The official code's custom layers, for one Keras (tf_keras or Keras 3), with that Keras' layers as `L`."""
    L = keras.layers

    class BatchNorm(L.BatchNormalization):
        """The official BatchNorm: always in training mode, so statistics come from the current batch at inference."""

        def call(self, inputs, training=None):
            return super().call(inputs, training=True)

    class BilinearUpsampling(L.Layer):
        """The official upsampling layer: resize_bilinear with align_corners=True."""

        def __init__(self, upsampling=(2, 2), **kwargs):
            super().__init__(**kwargs)
            self.upsampling = tuple(upsampling)

        def call(self, inputs):
            size = (inputs.shape[1] * self.upsampling[0], inputs.shape[2] * self.upsampling[1])
            return tf.compat.v1.image.resize_bilinear(inputs, size, align_corners=True)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], input_shape[1] * self.upsampling[0], input_shape[2] * self.upsampling[1],
                    input_shape[3])

        def get_config(self):
            return {**super().get_config(), "upsampling": self.upsampling}

    class Repeat(L.Layer):
        """The official Repeat layer: K.tile with a fixed repeat list."""

        def __init__(self, repeat_list, **kwargs):
            super().__init__(**kwargs)
            self.repeat_list = list(repeat_list)

        def call(self, inputs):
            return tf.tile(inputs, self.repeat_list)

        def get_config(self):
            return {**super().get_config(), "repeat_list": self.repeat_list}

    class MeanActivity(keras.regularizers.Regularizer):
        """The official l1_reg activity regulariser: K.mean of the layer's output."""

        def __call__(self, x):
            return tf.reduce_mean(x)

        def get_config(self):
            return {}

    return types.SimpleNamespace(L=L, keras=keras, BatchNorm=BatchNorm, BilinearUpsampling=BilinearUpsampling,
                                 Repeat=Repeat, MeanActivity=MeanActivity)


def bn_relu(k, x, block_id: str):
    x = k.BatchNorm(name=block_id + "_BN")(x)
    return k.L.Activation("relu", name=block_id + "_relu")(x)


def vgg16(k, x, dropout: bool):
    taps = []
    for b, (filters, n) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, n + 1):
            x = k.L.Conv2D(filters, (3, 3), activation="relu", padding="same", name=f"block{b}_conv{i}")(x)
        if b < 5:
            taps.append(x)
            x = k.L.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{b}_pool")(x)
        if dropout:
            x = k.L.Dropout(0.3)(x)
    taps.append(x)  # C5: after block5_conv3's dropout, no fifth pool
    return taps


def cfe(k, x, filters: int, block_id: str):
    branches = [k.L.Conv2D(filters, (1, 1), padding="same", use_bias=False, name=block_id + "_cfe0")(x)]
    for j, rate in enumerate((3, 5, 7), 1):
        branches.append(k.L.Conv2D(filters, (3, 3), dilation_rate=(rate, rate), padding="same", use_bias=False,
                                   name=f"{block_id}_cfe{j}_dilation")(x))
    x = k.L.Concatenate(name=block_id + "concatcfe", axis=-1)(branches)
    return bn_relu(k, x, block_id)


def channel_wise_attention(k, x, name: str):
    h, w, c = (int(d) for d in x.shape[1:])
    a = k.L.GlobalAveragePooling2D(name=name + "_GlobalAveragePooling2D")(x)
    a = k.L.Dense(c // 4, activation="relu")(a)  # unnamed in the official code
    a = k.L.Dense(c, activation="sigmoid", activity_regularizer=k.MeanActivity())(a)
    a = k.L.Reshape((1, 1, c), name=name + "_reshape")(a)
    a = k.Repeat([1, h, w, 1], name=name + "_repeat")(a)
    return k.L.Multiply(name=name + "_multiply")([a, x])


def spatial_attention(k, x, name: str):
    size = 9
    c = int(x.shape[-1])
    a1 = k.L.Conv2D(c // 2, (1, size), padding="same", name=name + "_1_conv1")(x)
    a1 = bn_relu(k, a1, "attention1_1")
    a1 = k.L.Conv2D(1, (size, 1), padding="same", name=name + "_1_conv2")(a1)
    a1 = bn_relu(k, a1, "attention1_2")
    a2 = k.L.Conv2D(c // 2, (size, 1), padding="same", name=name + "_2_conv1")(x)
    a2 = bn_relu(k, a2, "attention2_1")
    a2 = k.L.Conv2D(1, (1, size), padding="same", name=name + "_2_conv2")(a2)
    a2 = bn_relu(k, a2, "attention2_2")
    a = k.L.Add(name=name + "_add")([a1, a2])
    a = k.L.Activation("sigmoid")(a)
    return k.Repeat([1, 1, 1, c])(a)


def build_official(size: int = 256, dropout: bool = True, keras=tf_keras):
    """The official network with all switches on (with_CPFE, with_CA, with_SA), logits out, in `keras` (tf_keras,
    or Keras 3)."""
    k = official_layers(keras)
    L = k.L
    inputs = L.Input((size, size, 3))
    c1, c2, c3, c4, c5 = vgg16(k, inputs, dropout)
    c3 = cfe(k, c3, 32, "C3_cfe")
    c4 = k.BilinearUpsampling((2, 2), name="C4_cfe_up2")(cfe(k, c4, 32, "C4_cfe"))
    c5 = k.BilinearUpsampling((4, 4), name="C5_cfe_up4")(cfe(k, c5, 32, "C5_cfe"))
    c345 = L.Concatenate(name="C345_aspp_concat", axis=-1)([c3, c4, c5])
    c345 = channel_wise_attention(k, c345, "C345_ChannelWiseAttention_withcpfe")
    c345 = L.Conv2D(64, (1, 1), padding="same", name="C345_conv")(c345)
    c345 = bn_relu(k, c345, "C345")
    c345 = k.BilinearUpsampling((4, 4), name="C345_up4")(c345)

    sa = spatial_attention(k, c345, "spatial_attention")
    c1 = bn_relu(k, L.Conv2D(64, (3, 3), padding="same", name="C1_conv")(c1), "C1_BN")
    c2 = bn_relu(k, L.Conv2D(64, (3, 3), padding="same", name="C2_conv")(c2), "C2_BN")
    c2 = k.BilinearUpsampling((2, 2), name="C2_up2")(c2)
    c12 = L.Concatenate(name="C12_concat", axis=-1)([c1, c2])
    c12 = bn_relu(k, L.Conv2D(64, (3, 3), padding="same", name="C12_conv")(c12), "C12")
    c12 = L.Multiply(name="C12_atten_mutiply")([sa, c12])
    fused = L.Concatenate(name="fuse_concat", axis=-1)([c12, c345])
    logits = L.Conv2D(1, (3, 3), padding="same", name="sa")(fused)
    return keras.Model(inputs=inputs, outputs=logits)


def randomise(model, seed: int = 0, logit_scale: float = 1.0) -> None:
    """He-normal kernels, small random biases, random BN gamma/beta/moving statistics: every weight matters.

    logit_scale multiplies the fusion conv, to spread the sigmoid over the whole gray range.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape, name = tuple(w.shape), w.name.split("/")[-1].split(":")[0]
            if name == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                v = rng.normal(0, np.sqrt(2 / fan_in), shape) * (logit_scale if layer.name == "sa" else 1)
            elif name == "bias":
                v = rng.normal(0, 0.1, shape)
            elif name == "gamma":
                v = rng.uniform(0.5, 1.5, shape)
            elif name in ("beta", "moving_mean"):
                v = rng.normal(0, 0.5, shape)
            elif name == "moving_variance":
                v = rng.uniform(0.5, 2.0, shape)
            else:
                raise ValueError(f"unexpected weight {w.name}")
            values.append(v.astype(np.float32))
        if values:
            layer.set_weights(values)
