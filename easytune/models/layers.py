"""The building blocks of the decoder: :class:`Linear` (with its LoRA branch and, for QLoRA, NF4 kernels
dequantized in the layer), :class:`RMSNorm` and the parameter initializer :func:`param_init`.

Kernels are stored ``[in, out]`` (HF ``weight.T``).

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
    Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019.
    transformers ``models/llama/modeling_llama.py`` (v5): ``LlamaRMSNorm``, ``_init_weights``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from easytune import quant
from easytune.models.model_config import ModelConfig

Array = jax.Array


def param_init(config: ModelConfig, axes: tuple[str, ...]):
    """Normal(0, initializer_range) initializer carrying logical axis names (HF ``_init_weights``)."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


class Linear(nn.Module):
    """Dense layer ``y = x @ kernel (+ bias)`` with an optional LoRA branch.

    .. math::
        y = x W + b + s \\cdot (\\mathrm{dropout}(x) A) B

    The LoRA term is added only when the ``lora`` collection holds ``lora_A`` at this module's path
    (``lora_A: [in, r]``, ``lora_B: [r, out]``); dropout uses the ``'dropout'`` rng and runs only when
    ``deterministic`` is False.

    Attributes:
        features: output width.
        axes: logical axis names of the kernel ``(in_axis, out_axis)``; the bias gets ``(out_axis,)``.
        use_bias: whether to create a zero-initialized bias.
        config: the model config (initializer range, param dtype, compute dtype).
        lora_scale: ``s`` above (alpha / r, or alpha / sqrt(r) for rsLoRA).
        lora_dropout: dropout rate on the LoRA input.
        float32_out: return float32 instead of the compute dtype (used for logits).

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, eq. (3).
        peft ``tuners/lora/layer.py`` ``Linear.forward`` (dropout applies to the LoRA input only).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool
    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    float32_out: bool = False

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """Applies the layer to ``x [..., in]`` (flattened to ``[tokens, in]`` for the dots); returns
        ``[..., features]``."""
        dtype = jnp.dtype(self.config.compute_dtype)
        out_dtype = jnp.float32 if self.float32_out else dtype
        lead = x.shape[:-1]
        # 2-D dots over [tokens, in]: with the leading axes kept, XLA:CPU's layout assignment transposes the
        # [tokens, out] activation gradient (a strided copy as long as the matmul itself) to contract the
        # token axes for the LoRA / weight gradients; flattened, every dot takes its operands as they are.
        x = x.reshape(-1, x.shape[-1]).astype(dtype)
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if hasattr(stored, "codes"):  # QLoRA: an NF4 QTensor, dequantized here (and again in the backward pass)
            y = quant.qmatmul(x, stored, dtype)
        else:
            kernel = self.param("kernel", param_init(self.config, self.axes), (x.shape[-1], self.features),
                                jnp.dtype(self.config.dtype))
            y = jnp.einsum("...i,io->...o", x, kernel.astype(dtype), preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), jnp.dtype(self.config.dtype))
            y = y + bias.astype(dtype).astype(jnp.float32)
        if self.has_variable("lora", "lora_A"):
            lora_a = self.get_variable("lora", "lora_A").astype(dtype)  # [in, r]
            lora_b = self.get_variable("lora", "lora_B").astype(dtype)  # [r, out]
            h = x
            if not deterministic and self.lora_dropout > 0.0:
                h = nn.Dropout(rate=self.lora_dropout)(h, deterministic=False)
            low = jnp.einsum("...i,ir->...r", h, lora_a)
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", low, lora_b,
                                                 preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(*lead, self.features)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as HF ``LlamaRMSNorm`` (or ``Gemma2RMSNorm``).

    .. math::
        \\text{Llama: } y = w \\odot \\mathrm{cast}\\big(x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon}\\big);\\quad
        \\text{Gemma: } y = \\mathrm{cast}\\big((1 + w) \\odot x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon}\\big)

    With ``config.norm_unit_offset`` (Gemma) the weight is stored as an offset from one and initialised to
    zeros, and the product is taken in float32 before the cast (HF transformers PR #29402); otherwise the
    weight is initialised to ones and multiplies the cast result (Llama).

    Attributes:
        config: model config (eps, dtypes, ``norm_unit_offset``).

    References:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019.
        transformers ``LlamaRMSNorm``, ``Gemma2RMSNorm`` / ``Gemma3RMSNorm`` (v5).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes ``x [..., D]`` over its last axis (D, or E for the per-head q/k norms); returns the same
        shape in the compute dtype."""
        dtype = jnp.dtype(self.config.compute_dtype)
        offset = self.config.norm_unit_offset
        init = nn.initializers.zeros if offset else nn.initializers.ones
        weight = self.param("weight", nn.with_logical_partitioning(init, ("norm",)),
                            (x.shape[-1],), jnp.dtype(self.config.dtype))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(var + self.config.rms_norm_eps)
        if offset:
            return (x32 * (1.0 + weight.astype(jnp.float32))).astype(dtype)
        return weight.astype(dtype) * x32.astype(dtype)


def activation(name: str):
    """The MLP gate activation ``config.hidden_act``: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, the tanh
    approximation of GELU as ``torch.nn.functional.gelu(approximate="tanh")``)."""
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    return nn.silu
