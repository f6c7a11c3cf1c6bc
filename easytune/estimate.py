"""Will it fit? Memory and FLOPs of one training step, from the model's config.json alone (no weights).

Per device and in total, in bytes, following EleutherAI's "Transformer Math 101" and counting what easytune
actually allocates:

    weights       frozen params x bytes(model.dtype); QLoRA kernels 4 + 8/64 + 32/16384 bits each
                  (easytune/quant.py); LoRA weights are float32
    gradients     trainable params x bytes(their dtype)
    optimizer     trainable params x bytes x 3: AdamW's mu and nu (optax keeps them in the params' dtype)
                  and optax.MultiSteps' accumulated gradient. (Transformer Math's mixed-precision AdamW is
                  12 bytes/param: an fp32 master copy + mu + nu; with bf16 weights and grads that is the
                  quoted 16 bytes/param, printed as the reference figure.)
    dequantized   QLoRA: one layer's NF4 kernels in the compute dtype, held by the step (``Estimate.dequantized``)
    activations   per decoder layer, what the backward pass keeps (Korthikanti et al. 2022 / Transformer
                  Math's ``sbh(34 + 5as/h)``, recounted for Llama: RMSNorm instead of LayerNorm, SwiGLU with
                  F = intermediate_size, grouped-query K/V, no dropout, softmax in float32):
                      p * s*b*(6h + 2*K*E + 4F)  +  attention           (p = bytes of model.compute_dtype)
                  where attention is 8 * a*s^2*b for the unblocked ``[T, S]`` softmax (``model.attention``
                  "xla", or "auto" at one block) and 4 * a*s*b (the float32 row log-sum-exp) for the
                  attention whose memory is linear in length ("auto" beyond one block: blockwise, splash,
                  cuDNN; Dao et al. 2022), plus one block pair's float32 scores, 4 * a*block^2*b, once;
                  with ``model.remat`` (``nn.remat`` per layer): p*s*b*h per layer plus one layer recomputed;
                  outside the layers: embeddings 2 p*s*b*h and the float32 logits, their softmax and their
                  gradient, 3 * 4 * c*V, c = s*b tokens, or ``train.loss_chunk_tokens`` when the loss is
                  chunked (easytune/train/step.py: one chunk's logits at a time).
    host (CPU)    ``easytune estimate --device cpu`` (and :func:`stage_peaks`) count what XLA:CPU keeps, as
                  measured with ``easytune train --dry-run`` on Llama-3.2-1B's shape (bench/billion.py): it
                  does not schedule for memory, so ``model.remat`` changes nothing (11.42 vs 11.30 GiB) and
                  each layer keeps its forward intermediates in float32, 4 * s*b*(10h + 3*K*E + 5F) (x, the
                  norms, q, its rotation, attention and o_proj outputs, the two residual sums; k, v, rotated
                  k; gate, up, sigmoid(gate), silu(gate), their product) plus attention; two chunks of float32
                  logits, 2 * 4 * c*V; and with 16-bit params a float32 copy of the embedding, 4 * V*h.
    FLOPs/step    6 N D for full fine-tuning; 4 N D + 6 N_lora D for (Q)LoRA (no weight gradients for the
                  frozen N) with D tokens per optimizer step (Kaplan et al. 2020; Transformer Math 101).

Sharding: params, gradients and optimizer state divide over ``fsdp * tensor`` (the logical-axis rules in
easytune/sharding.py), the stacked expert weights of a mixture-of-experts model over ``expert * fsdp * tensor``;
activations over the batch (``data * fsdp * expert``: ``micro_batch_size`` sequences each) and their head/MLP
parts over ``tensor``.

Mixture of experts (``num_experts`` X > 0; Mixtral, Qwen3-MoE; easytune/models/moe.py): a sparse layer's MLP is
a router ``mlp.gate`` [X, D] (no ``Linear``: never a LoRA target, never quantized) and X experts stored stacked,
gate/up [X, D, F] and down [X, F, D] (F = ``moe_intermediate_size``). The experts are no LoRA targets either
(frozen under (Q)LoRA); QLoRA stores each expert in NF4 on its own (``quant.quantize`` of a 3-D stack) unless
``qlora.llm_int8_skip_modules`` names ``experts``, and dequantizes a layer's whole stack in the step. Each token
runs through k = ``num_experts_per_tok`` of them: the *active* parameters per token are the total minus (X - k)
experts per sparse layer (Mixtral-8x7B: 46.7B total, 12.9B active), and the FLOPs count the active ones
(6 N_active D). The activations of a sparse layer count k * F per token in place of F (the grouped matmuls
compute only the routed pairs), plus the router's float32 softmax [T, X].

References:
    Anthony, Biderman, Schoelkopf, "Transformer Math 101", EleutherAI blog, 2023.
    Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness".
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.
    Dettmers et al. 2023, "QLoRA", section 3 (storage of NF4 + double quantization).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

GiB = 2 ** 30
GB = 10 ** 9

# Memory per device (what one JAX device / GPU sees), bytes. TPU v2/v3 expose each TensorCore as a device.
DEVICES: dict[str, tuple[int, str]] = {
        "tpu-v2": (8 * GiB, "TPU v2 core (16 GiB HBM per chip, 2 cores)"),
        "tpu-v3": (16 * GiB, "TPU v3 core (32 GiB HBM per chip, 2 cores)"),
        "tpu-v4": (32 * GiB, "TPU v4 chip"),
        "tpu-v5e": (16 * GiB, "TPU v5e chip"),
        "tpu-v5p": (95 * GiB, "TPU v5p chip"),
        "tpu-v6e": (32 * GiB, "TPU v6e (Trillium) chip"),
        "t4": (16 * GiB, "NVIDIA T4 16 GB"),
        "v100": (32 * GiB, "NVIDIA V100 32 GB"),
        "a10g": (24 * GiB, "NVIDIA A10G 24 GB"),
        "l4": (24 * GiB, "NVIDIA L4 24 GB"),
        "rtx3090": (24 * GiB, "NVIDIA RTX 3090 24 GB"),
        "rtx4090": (24 * GiB, "NVIDIA RTX 4090 24 GB"),
        "a6000": (48 * GiB, "NVIDIA RTX A6000 48 GB"),
        "l40s": (48 * GiB, "NVIDIA L40S 48 GB"),
        "a100-40": (40 * GiB, "NVIDIA A100 40 GB"),
        "a100-80": (80 * GiB, "NVIDIA A100 80 GB"),
        "h100": (80 * GiB, "NVIDIA H100 80 GB"),
        "h200": (141 * GB, "NVIDIA H200 141 GB"),
        "b200": (180 * GB, "NVIDIA B200 180 GB"),
}


def host_memory() -> int:
    """This machine's physical RAM in bytes (``sysconf``)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(name: str) -> tuple[int, str]:
    """``(bytes per device, description)`` for a name in :data:`DEVICES` or ``"cpu"`` (this host's RAM).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = name.lower().replace("_", "-")
    if key in ("cpu", "host"):
        return host_memory(), "this machine's RAM"
    key = {"v2": "tpu-v2", "v3": "tpu-v3", "v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p",
           "v6e": "tpu-v6e"}.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: cpu, {', '.join(DEVICES)}")
    return DEVICES[key]


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device (``*_per_device``) and the counts they come from.

    Attributes:
        params, trainable_params, quantized_params: parameter counts.
        weights, gradients, optimizer, activations, activations_no_remat, activations_remat: bytes per
            device (``activations`` is the one the config's ``model.remat`` selects).
        dequantized: QLoRA only: one decoder layer's NF4 kernels dequantized to the compute dtype (each
            ``Linear`` dequantizes its own kernel inside the step); bytes per device.
        total: weights + gradients + optimizer + activations + dequantized, bytes per device.
        devices: devices in the mesh; ``total * devices`` is the whole job.
        tokens_per_step: tokens per optimizer step (global batch x sequence_len).
        flops_per_step: training FLOPs per optimizer step (whole job).
        reference_16_bytes: Transformer Math 101's mixed-precision full fine-tuning figure, 16 bytes x params.
        attention: "xla" (the ``[T, S]`` softmax is kept) or "linear" (memory linear in length).
        host: activations counted as XLA:CPU keeps them (module docstring), which ``remat`` does not change.
        active_params: parameters one token runs through (``params`` for a dense model; a mixture-of-experts
            model counts k of its X experts per sparse layer); the FLOPs count these.
        expert_params: parameters of the stacked expert weights (0 for a dense model).
        expert_weights: bytes per device of the expert weights, a part of ``weights`` (split over
            ``mesh.expert * fsdp * tensor``).
        num_experts, experts_per_tok, moe_layers: X, k and the number of sparse layers (0 for a dense model).
        expert_axis: the resolved ``mesh.expert``.
    """
    params: int
    trainable_params: int
    quantized_params: int
    weights: float
    gradients: float
    optimizer: float
    activations_no_remat: float
    activations_remat: float
    dequantized: float
    remat: bool
    devices: int
    tokens_per_step: int
    flops_per_step: float
    reference_16_bytes: float
    attention: str = "xla"
    host: bool = False
    active_params: int = 0
    expert_params: int = 0
    expert_weights: float = 0.0
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_layers: int = 0
    expert_axis: int = 1

    @property
    def activations(self) -> float:
        return self.activations_remat if self.remat and not self.host else self.activations_no_remat

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.dequantized


def _linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """HF module name -> (in, out) of every linear layer (every ``kernel`` of easytune's params tree) of a
    ``ModelConfig``: q/k/v/o_proj or Phi-3's fused ``qkv_proj`` [D, (H + 2K) E]; per dense layer gate/up/down_proj
    or Phi-3's fused ``gate_up_proj`` [D, 2F] (a sparse layer's router and experts are no ``Linear``:
    :func:`_expert_shapes`); ``lm_head`` unless tied."""
    h, e = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * e, cfg.num_key_value_heads * e
    f = cfg.intermediate_size
    out = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if cfg.fused_qkv:
            out[p + "self_attn.qkv_proj"] = (h, q + 2 * kv)
        else:
            out.update({p + "self_attn.q_proj": (h, q), p + "self_attn.k_proj": (h, kv),
                        p + "self_attn.v_proj": (h, kv)})
        out[p + "self_attn.o_proj"] = (q, h)
        if cfg.layer_is_moe(i):
            continue
        if cfg.fused_gate_up:
            out.update({p + "mlp.gate_up_proj": (h, 2 * f), p + "mlp.down_proj": (f, h)})
        else:
            out.update({p + "mlp.gate_proj": (h, f), p + "mlp.up_proj": (h, f), p + "mlp.down_proj": (f, h)})
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (h, cfg.vocab_size)
    return out


def _expert_shapes(cfg) -> dict[str, tuple[int, int, int]]:
    """Param path (HF-style) -> (X, in, out) of the stacked expert weights of every sparse layer:
    ``mlp.experts.gate_proj`` / ``up_proj`` [X, D, F], ``down_proj`` [X, F, D] (F = ``moe_intermediate_size``);
    empty for a dense model."""
    x, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    out = {}
    for i in range(cfg.num_hidden_layers):
        if cfg.layer_is_moe(i):
            p = f"model.layers.{i}.mlp.experts."
            out.update({p + "gate_proj": (x, h, f), p + "up_proj": (x, h, f), p + "down_proj": (x, f, h)})
    return out


def _norm_params(cfg) -> int:
    """Parameters of the RMSNorms: two per layer (four with Gemma's ``sandwich_norm``), the final one, and
    ``q_norm`` / ``k_norm`` [E] per layer with ``qk_norm`` (Qwen3, Gemma 3)."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = (4 if cfg.sandwich_norm else 2) * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return L * per_layer + h


def _bias_params(cfg) -> int:
    """Parameters of the biases: q/k/v (and o_proj unless ``o_proj_bias`` is False, Qwen2) with
    ``attention_bias``; gate/up/down of every dense MLP layer with ``mlp_bias`` (experts carry none)."""
    h, e, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    out = 0
    if cfg.attention_bias:
        o_bias = cfg.attention_bias if cfg.o_proj_bias is None else cfg.o_proj_bias
        out += L * (cfg.num_attention_heads * e + 2 * cfg.num_key_value_heads * e + (h if o_bias else 0))
    if cfg.mlp_bias:
        out += sum(2 * cfg.intermediate_size + h for i in range(L) if not cfg.layer_is_moe(i))
    return out


def _nf4_bytes(n: int, double_quant: bool) -> int:
    """Storage of one NF4 kernel of ``n`` params, exactly as :func:`easytune.quant.quantize` lays it out."""
    blocks = -(-n // 64)
    if double_quant:
        return blocks * 32 + blocks + 4 * -(-blocks // 256) + 4
    return blocks * 32 + 4 * blocks + 4


def estimate(cfg, *, method: str, micro_batch_size: int, sequence_len: int, accumulation: int = 1,
             mesh: tuple[int, ...] = (1, 1, 1), dtype: str = "float32", compute_dtype: str = "float32",
             remat: bool = False, lora_r: int = 8, target_modules="all-linear", modules_to_save=(),
             skip_modules=("lm_head",), double_quant: bool = True, attention: str = "auto",
             attention_block: int = 512, loss_chunk_tokens: int = 0, host: bool = False) -> Estimate:
    """Memory per device and FLOPs per optimizer step of one training configuration (module docstring).

    Args:
        cfg: :class:`easytune.models.model_config.ModelConfig` (e.g. from ``hf_config.config_from_hf(config.json)``).
        method: "full" | "lora" | "qlora".
        micro_batch_size: sequences per data-parallel device per micro-step.
        sequence_len: tokens per sequence.
        accumulation: micro-steps per optimizer step.
        mesh: resolved mesh sizes: ``(data, fsdp, tensor)`` (``mesh.expert`` = 1) or a
            :class:`easytune.sharding.MeshSizes` / 4-tuple ``(data, fsdp, expert, tensor)`` (``mesh_sizes``).
        dtype / compute_dtype: ``model.dtype`` / ``model.compute_dtype`` names.
        remat: ``model.remat``.
        lora_r, target_modules, modules_to_save: LoRA settings (PEFT rules, easytune/lora.py).
        skip_modules, double_quant: QLoRA settings (``qlora.llm_int8_skip_modules``,
            ``qlora.bnb_4bit_use_double_quant``).
        attention, attention_block: ``model.attention`` / ``model.attention_block`` (:func:`attention_memory`).
        loss_chunk_tokens: ``train.loss_chunk_tokens`` (0: the whole ``[B, T, V]`` logits at once).
        host: count the activations as XLA:CPU keeps them (module docstring: "host (CPU)").

    Returns:
        an :class:`Estimate`.

    Raises:
        ValueError: unknown ``method``; a ``mesh.expert`` that does not divide ``cfg.num_experts``
            (:func:`easytune.sharding.check_expert_axis`, naming both); ``mesh`` not 3 or 4 sizes.
    """
    from easytune import lora as lora_lib
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    data, fsdp, expert, tensor = _mesh4(mesh)
    if cfg.num_experts and cfg.num_experts % expert:
        from easytune.sharding import check_expert_axis
        check_expert_axis(expert, cfg.num_experts)
    p_w, p_a = _itemsize(dtype), _itemsize(compute_dtype)
    h, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    a, kv, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    linear = _linear_shapes(cfg)
    experts = _expert_shapes(cfg)
    moe_layers = sum(cfg.layer_is_moe(i) for i in range(L))
    routers = moe_layers * h * cfg.num_experts  # mlp.gate [X, D]: no Linear, never LoRA-adapted nor quantized
    other = v * h + _norm_params(cfg) + _bias_params(cfg) + routers  # embeddings, norms, biases, routers
    n_linear = sum(i * o for i, o in linear.values())
    n_expert = sum(x * i * o for x, i, o in experts.values())
    params = other + n_linear + n_expert
    k = cfg.num_experts_per_tok if moe_layers else 0
    # one token runs through k of the X experts of each sparse layer
    active = params - (n_expert * (cfg.num_experts - k) // cfg.num_experts if moe_layers else 0)

    shard = fsdp * tensor
    # bytes of each decoder layer's NF4 kernels once dequantized (QLoRA), per device: "i" -> bytes
    per_layer_q: dict[str, float] = {}

    def layer_of(name: str) -> str:
        return name.split(".")[2] if name.startswith("model.layers.") else name

    def skipped(module: str) -> bool:  # quant.should_quantize's rule
        return any(module == m or module.endswith("." + m) for m in skip_modules)

    if method == "full":
        trainable, train_bytes = params, params * p_w
        frozen_bytes, quantized = 0.0, 0
        expert_bytes = n_expert * p_w
    else:
        targets = lora_lib.parse_target_modules(target_modules) if isinstance(target_modules, str) else tuple(
            target_modules)
        saved = set()
        for t in modules_to_save:
            saved |= {n for n in list(linear) + ["model.embed_tokens"] if n == t or n.endswith("." + t)}
        n_lora = sum(lora_r * (i + o) for n, (i, o) in linear.items()
                     if lora_lib.matches_target(n, targets) and n not in saved)
        n_saved = sum(i * o for n, (i, o) in linear.items() if n in saved) + (
            v * h if "model.embed_tokens" in saved else 0)
        trainable = n_lora + n_saved
        if not trainable:
            raise ValueError(f"lora.target_modules={target_modules!r} matches no linear module of this model "
                             f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear}))}) and "
                             f"lora.modules_to_save={list(modules_to_save)!r} none: nothing would be trained")
        train_bytes = 4 * n_lora + p_w * n_saved           # LoRA weights are float32 (lora.init_lora)
        frozen_linear = {n: s for n, s in linear.items() if n not in saved}
        frozen_other = other - (v * h if "model.embed_tokens" in saved else 0)
        quantized = 0
        frozen_bytes = frozen_other * p_w
        for n, (i, o) in frozen_linear.items():
            if method == "qlora" and not skipped(n):
                frozen_bytes += _nf4_bytes(i * o, double_quant)
                quantized += i * o
                per_layer_q[layer_of(n)] = per_layer_q.get(layer_of(n), 0) + i * o * p_a / shard
            else:
                frozen_bytes += i * o * p_w
        # the stacked experts: frozen; under QLoRA each expert NF4 on its own (quant.quantize of a 3-D stack)
        expert_bytes = 0
        for n, (x, i, o) in experts.items():
            if method == "qlora" and not skipped(n.rsplit(".", 1)[0]):
                expert_bytes += x * _nf4_bytes(i * o, double_quant)
                quantized += x * i * o
                per_layer_q[layer_of(n)] = per_layer_q.get(layer_of(n), 0) + x * i * o * p_a / (shard * expert)
            else:
                expert_bytes += x * i * o * p_w
        frozen_bytes += expert_bytes

    # the expert weights also split over mesh.expert; every other parameter is replicated over it
    expert_weights = expert_bytes / (shard * expert)
    expert_train = expert_weights if method == "full" else 0.0
    weights = (frozen_bytes + train_bytes - expert_bytes) / shard + expert_weights
    gradients = (train_bytes - (expert_bytes if method == "full" else 0)) / shard + expert_train
    optimizer = 3 * gradients

    s, b = sequence_len, micro_batch_size
    impl = attention_memory(attention, s, attention_block)
    block = min(attention_block, s)
    attn = 8 * (a / tensor) * s * s * b if impl == "xla" else 4 * (a / tensor) * s * b
    once = 0.0 if impl == "xla" else 4 * (a / tensor) * block * block * b  # one block pair's scores
    c = min(s * b, loss_chunk_tokens) if loss_chunk_tokens > 0 else s * b  # tokens whose logits exist at once
    layers = []
    for i in range(L):
        # a sparse layer: each token's MLP activations in its k experts, and the router's float32 logits [T, X]
        f, router = ((cfg.num_experts_per_tok * cfg.moe_intermediate_size, 4 * s * b * cfg.num_experts)
                     if cfg.layer_is_moe(i) else (cfg.intermediate_size, 0))
        if host:  # XLA:CPU (module docstring): float32 intermediates of every layer, remat or not
            layers.append(4 * s * b * (10 * h + 3 * kv * e + 5 * f) / tensor + attn + router)
        else:
            layers.append(p_a * s * b * (2 * h + (4 * h + 2 * kv * e + 4 * f) / tensor) + attn + router)
    if host:
        outside = 2 * 4 * c * v / tensor + (4 * v * h if p_w < 4 else 0) + once
    else:
        outside = 2 * p_a * s * b * h + 3 * 4 * c * v / tensor + once
    per_layer = max(layers)
    # + the gradient of one layer's activations, live while the backward pass works through that layer
    no_remat = sum(layers) + per_layer + outside
    with_remat = L * p_a * s * b * h + 2 * per_layer + outside
    # each Linear dequantizes its NF4 kernel itself (quant.qmatmul, recomputed in the backward pass), so the step
    # holds about one decoder layer's kernels in the compute dtype (measured on an H200: bench/qlora_memory.py;
    # XLA:CPU's scheduler does not achieve this and holds them all)
    dequant = max(per_layer_q.values(), default=0.0)

    dp = data * fsdp * expert  # the batch is split over every data-like axis (easytune.sharding.BATCH_AXES)
    tokens = micro_batch_size * dp * accumulation * sequence_len
    if method == "full":
        flops = 6.0 * active * tokens
    else:
        flops = 4.0 * active * tokens + 6.0 * trainable * tokens
    return Estimate(params=params, trainable_params=trainable, quantized_params=quantized, weights=weights,
                    gradients=gradients, optimizer=optimizer, activations_no_remat=no_remat,
                    activations_remat=with_remat, dequantized=dequant, remat=remat,
                    devices=data * fsdp * expert * tensor, tokens_per_step=tokens, flops_per_step=flops,
                    reference_16_bytes=16.0 * params, attention=impl, host=host, active_params=active,
                    expert_params=n_expert, expert_weights=expert_weights, num_experts=cfg.num_experts if k else 0,
                    experts_per_tok=k, moe_layers=moe_layers, expert_axis=expert)


def _mesh4(mesh) -> tuple[int, int, int, int]:
    """``(data, fsdp, expert, tensor)`` from :func:`estimate`'s ``mesh`` (3 sizes: ``expert`` = 1).

    Raises:
        ValueError: not 3 or 4 sizes.
    """
    sizes = tuple(int(x) for x in mesh)
    if len(sizes) == 3:
        return sizes[0], sizes[1], 1, sizes[2]
    if len(sizes) == 4:
        return sizes
    raise ValueError(f"mesh must be (data, fsdp, tensor) or (data, fsdp, expert, tensor), got {mesh!r}")


def attention_memory(attention: str, sequence_len: int, block: int) -> str:
    """How the attention ``model.attention`` picks for ``sequence_len`` tokens uses memory: ``"xla"`` (the
    ``[T, S]`` probabilities are kept) or ``"linear"`` (blockwise, splash or cuDNN: linear in length).

    As :func:`easytune.models.attend.resolve`: "auto" is blockwise (or the backend's fused kernel) when the
    queries span more than one block of ``block`` tokens, else "xla"; "blockwise", "splash" and "cudnn" are
    linear (the fused kernels fall back to blockwise for shapes they do not take).
    """
    if attention == "xla" or (attention == "auto" and sequence_len <= block):
        return "xla"
    return "linear"


def resolve_mesh(mesh_cfg, num_devices: int):
    """:class:`easytune.sharding.MeshSizes` ``(data, fsdp, expert, tensor)`` with a -1 entry resolved against
    ``num_devices``.

    Raises:
        ValueError: the sizes do not fit ``num_devices`` (names the keys).
    """
    from easytune.sharding import mesh_sizes  # the trainer's own rule, so the estimate sees its mesh
    return mesh_sizes(mesh_cfg, num_devices)


def model_config(config):
    """The :class:`ModelConfig` a run config trains: ``model.path``/config.json, or a preset (vocab from the
    tokenizer when one is configured, else 512 as the quickstart's)."""
    from easytune import presets
    from easytune.models import hf_config
    from easytune.models.model_config import ModelConfig
    if config.model.path:
        path = pathlib.Path(config.model.path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model.path: no config.json in {config.model.path}")
        return hf_config.read_config(config.model.path)
    vocab = 512
    tok = config.tokenizer.path
    if tok and (pathlib.Path(tok) / "tokenizer.json").is_file():
        vocab = len(json.loads((pathlib.Path(tok) / "tokenizer.json").read_text())["model"]["vocab"])
    return ModelConfig(vocab_size=vocab, **presets.PRESETS[config.model.preset])


def estimate_config(config, num_devices: int = 1, host: bool = False) -> Estimate:
    """:func:`estimate` for a run config (``easytune.config`` vocabulary) on ``num_devices`` devices (``host``:
    this machine's CPU, as XLA:CPU keeps the activations).

    Raises:
        ValueError: ``num_devices < 1``.
        easytune.config.ConfigError: ``train.micro_batch_size`` or ``train.gradient_accumulation_steps`` below 1,
            ``data.sequence_len`` below 2, a ``model.*`` key :func:`easytune.config_check.validate_compute` refuses
            (the key named).
        FileNotFoundError: ``model.path`` holds no ``config.json``.
        ValueError: the ``mesh.*`` sizes do not fit ``num_devices``, or ``mesh.expert`` does not divide the model's
            ``num_experts`` (both named).
    """
    from easytune import config as config_lib
    if num_devices < 1:
        raise ValueError(f"--num-devices must be >= 1, got {num_devices}")
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        if config.train[key] < 1:
            raise config_lib.ConfigError(f"config key 'train.{key}': must be >= 1, got {config.train[key]}")
    if config.data.sequence_len < 2:
        raise config_lib.ConfigError(f"config key 'data.sequence_len': must be >= 2, got {config.data.sequence_len}")
    from easytune import config_check
    config_check.validate_compute(config)  # the model.* keys train checks (dtype, remat, attention, ...)
    return estimate(model_config(config), method=config_method(config),
                    micro_batch_size=config.train.micro_batch_size,
                    sequence_len=config.data.sequence_len, accumulation=config.train.gradient_accumulation_steps,
                    mesh=resolve_mesh(config.mesh, num_devices), dtype=config.model.dtype,
                    compute_dtype=config.model.compute_dtype,
                    remat=config_lib.remat_policy_name(config.model.remat) != "none", lora_r=config.lora.r,
                    target_modules=config.lora.target_modules,
                    modules_to_save=tuple(config.lora.modules_to_save),
                    skip_modules=tuple(config.qlora.llm_int8_skip_modules),
                    double_quant=bool(config.qlora.bnb_4bit_use_double_quant), attention=config.model.attention,
                    attention_block=int(config.model.attention_block),
                    loss_chunk_tokens=int(config.train.loss_chunk_tokens), host=host)


# Resident memory of an easytune process besides its arrays, by stage: the interpreter, JAX's CPU client,
# transformers, torch and orbax imported, and compiling; ``train`` also prepares the data, compiles the eval
# step and draws the curves (measured by bench/billion.py --tiny, whose arrays are a few MB: load 0.61,
# train 1.04, sample 0.80-0.95, export 0.58 GB).
HOST_RUNTIME = {"load": 0.6 * GB, "train": 1.0 * GB, "sample": 0.8 * GB, "export": 0.6 * GB}


def _largest_weight_file(model_path: str) -> int:
    """Bytes of the largest safetensors / ``.bin`` file of a model dir (0 without one, e.g. a preset)."""
    if not model_path:
        return 0
    files = [f for pattern in ("*.safetensors", "*.bin") for f in pathlib.Path(model_path).glob(pattern)]
    return max((f.stat().st_size for f in files), default=0)


def stage_peaks(config, num_devices: int = 1) -> dict[str, float]:
    """Peak host memory (resident set, bytes) of each stage of a run on this machine's CPU.

    What each stage holds, from the code that runs (bench/billion.py measures it on Llama-3.2-1B's shape):

    - ``load`` (``easytune.train.setup.build``): the stage's :data:`HOST_RUNTIME`, the params (:attr:`Estimate.weights`)
      and the checkpoint file being read (``safetensors`` maps it; the pages read count in the resident set
      until it is closed): the largest weight file of ``model.path``.
    - ``train`` (one step of ``easytune train``): the runtime, :attr:`Estimate.total` with
      ``host=True`` (XLA:CPU's activations), or the load when that is larger.
    - ``sample`` (``easytune generate RUN_DIR``): the runtime, the run's weights, a QLoRA base's kernels
      dequantized to float32 (``quant.dequantize_tree``), and XLA:CPU's float32 copies of the 16-bit matrices
      the decoding reads (a dot of 16-bit operands runs in float32 there): every float kernel once and the
      embedding three times (its lookup, the prefill's and the decode loop's logits; tied or ``lm_head``).
    - ``export`` (``easytune export RUN_DIR --merged``): the runtime, the run's weights (a QLoRA base's kernels
      dequantized to float32 besides) and every linear kernel twice more: merged (``lora.merge``, in its
      dtype) and transposed to torch's ``[out, in]`` for saving (``hf_weights.params_to_state_dict``).

    Raises what :func:`estimate_config` raises.
    """
    est = estimate_config(config, num_devices, host=True)
    cfg = model_config(config)
    h, v = cfg.hidden_size, cfg.vocab_size
    p_w = _itemsize(config.model.dtype)
    norms = _norm_params(cfg)
    kernels = est.params - v * h * (1 if cfg.tie_word_embeddings else 2) - norms
    rt = HOST_RUNTIME
    load = rt["load"] + est.weights + _largest_weight_file(config.model.path)
    dequantized = 4 * est.quantized_params  # QLoRA: dequantize_tree to float32 before decoding
    copies = 0.0 if p_w == 4 else 4 * (kernels - est.quantized_params) + 3 * 4 * v * h
    return {"load": load,
            "train": max(load, rt["train"] + est.total),
            "sample": rt["sample"] + est.weights + est.optimizer + dequantized + copies,
            "export": rt["export"] + est.weights + dequantized + 2 * (dequantized + p_w * (
                    est.params - v * h - norms - est.quantized_params))}


def config_method(config) -> str:
    """The estimate's method of a run config: ``"full"`` (also for ``pretrain``), ``"lora"`` or ``"qlora"``."""
    return "full" if config.method in ("full", "pretrain") else config.method


def config_report(config, device: str, num_devices: int = 1) -> str:
    """``easytune estimate CONFIG``: :func:`report` of :func:`estimate_config` on ``num_devices`` devices of the
    kind ``device`` (a name of :func:`device_memory`); for ``cpu``, as XLA:CPU keeps the activations and with
    the :func:`stage_peaks` of the run's life. Raises what :func:`estimate_config` raises."""
    host = device.lower() in ("cpu", "host")
    text = report(estimate_config(config, num_devices, host=host), device, config_method(config))
    if not host:
        return text
    peaks = stage_peaks(config, num_devices)
    return text + "\npeak memory by stage on this CPU (resident set, with the process's runtime): " + ", ".join(
            f"{name} {_gb(peaks[key])}" for name, key in (("load", "load"), ("train step", "train"),
                                                          ("sample", "sample"), ("export", "export")))


def _gb(x: float) -> str:
    if x < 1e9:
        return f"{x / 1e6:,.2f} MB"
    return f"{x / GB:,.2f} GB" if x < 10 * GB else f"{x / GB:,.1f} GB"


def advice(est: Estimate, capacity: float, method: str) -> list[str]:
    """What to change when ``est.total`` exceeds ``capacity`` bytes per device, most effective first."""
    tips = []
    if not est.remat and not est.host and est.activations_no_remat > est.activations_remat * 1.5:
        tips.append(f"--config.model.remat=full: activations {_gb(est.activations_no_remat)} -> "
                    f"{_gb(est.activations_remat)} per device (one more forward pass, ~+33% FLOPs)")
    if est.activations > 0.25 * capacity:
        tips.append("a smaller --config.train.micro_batch_size with a larger "
                    "--config.train.gradient_accumulation_steps (same global batch; activations scale with it)")
    if method != "qlora":
        tips.append("--config.method=qlora: NF4 base weights (4.127 bits/param) and only LoRA weights trained")
    if est.expert_params and est.expert_weights > 0.25 * capacity and est.expert_axis < est.num_experts:
        tips.append(f"a larger --config.mesh.expert (now {est.expert_axis}, a divisor of num_experts="
                    f"{est.num_experts}): the expert weights ({_gb(est.expert_weights)} per device) split over it")
    shardable = est.weights + est.gradients + est.optimizer + est.dequantized
    room = capacity - est.activations
    if room > 0 and shardable > room:
        need = math.ceil(shardable * est.devices / room)
        tips.append(f"more fsdp: shard params/gradients/optimizer over >= {need} devices (--config.mesh.fsdp)")
    return tips


def report(est: Estimate, device: str, method: str) -> str:
    """A human-readable table: each component per device and in total, FLOPs, and whether it fits ``device``."""
    cap, desc = device_memory(device)
    n = est.devices
    rows = [("weights", est.weights), ("gradients", est.gradients),
            ("optimizer (AdamW mu, nu + accumulated grads)", est.optimizer),
            (f"activations ({'with' if est.remat else 'without'} remat)", est.activations),
            ("  (activations without remat)", est.activations_no_remat),
            ("  (activations with remat)", est.activations_remat)]
    if est.host:  # XLA:CPU keeps every layer's activations whatever model.remat says (module docstring)
        rows[3:] = [("activations (XLA:CPU: remat changes nothing)", est.activations)]
    if est.expert_params:
        rows.insert(1, (f"  (of which experts, split over mesh.expert={est.expert_axis})", est.expert_weights))
    if est.dequantized:
        rows.append(("dequantized NF4 kernels (one layer, compute dtype)", est.dequantized))
    base = ("" if method == "full" else " in the base model")
    lines = [f"params {est.params:,}{base} ({est.trainable_params:,} trainable"
             + (" LoRA/saved" if method != "full" else "")
             + (f", {est.quantized_params:,} in NF4" if est.quantized_params else "") + f"); {n} device(s)"]
    if est.expert_params:
        lines.append(f"mixture of experts: {est.active_params:,} params active per token ({est.experts_per_tok} of "
                     f"{est.num_experts} experts in {est.moe_layers} sparse layers); {est.expert_params:,} params "
                     f"in experts")
    lines.append(f"{'':48s}{'per device':>14s}{'total':>14s}")
    for name, value in rows:
        lines.append(f"{name:48s}{_gb(value):>14s}{_gb(value * n):>14s}")
    lines.append(f"{'total':48s}{_gb(est.total):>14s}{_gb(est.total * n):>14s}")
    lines.append(f"Transformer Math 101 reference (16 bytes/param, mixed-precision full fine-tuning): "
                 f"{_gb(est.reference_16_bytes)} without activations")
    n_sym = "N_active" if est.expert_params else "N"
    lines.append(f"FLOPs per optimizer step: {est.flops_per_step:.3e} ({est.tokens_per_step:,} tokens; "
                 f"{'6' if method == 'full' else '4'}·{n_sym}·D" + ("" if method == "full" else " + 6·N_lora·D")
                 + ")")
    fits = est.total <= cap
    lines.append(f"{desc}: {_gb(cap)} per device -> {'fits' if fits else 'does NOT fit'} "
                 f"({100 * est.total / cap:.0f}% used)")
    if not fits:
        lines += ["to make it fit, try:"] + [f"  - {t}" for t in advice(est, cap, method)]
    return "\n".join(lines)
