"""Loading tokenizers and models, quantization and LoRA configs, and the pad-token fix.

Factories return library objects (BitsAndBytesConfig, LoraConfig) or None, as trl's scripts do.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

from . import upstream
from .cpu import memory as cpu_memory
from .builtin_models import resolve_model_path
from .errors import LoraFtError

# Head modules a sequence classifier adds on top of its backbone, by architecture family.
HEAD_NAMES = ("score", "classifier", "pre_classifier")
# Kept in full precision when quantizing. Naming any skip module drops transformers' own default (the output
# head), so the LM head is named too: a 4-bit lm_head breaks trl's logit kernels and costs quality for nothing.
QUANT_SKIP = HEAD_NAMES + ("lm_head",)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def check_weights_safe(path: str, allow_pickle: bool) -> None:
    """Refuse a local folder that only has pickled weights unless the recipe allows it."""
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    has_safe = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if has_pickle and not has_safe:
        raise LoraFtError(
            f"{path}: only pickled .bin weights (can run code when loaded); convert to safetensors or set allow_pickle: true"
        )


def load_tokenizer(args):
    from transformers import AutoTokenizer

    path = resolve_model_path(args.model_name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoraFtError(f"model_name_or_path: cannot load a tokenizer from '{args.model_name_or_path}' ({_first_line(e)})") from None
    fix_pad_token(tok)
    if args.chat_template:
        tok.chat_template = args.chat_template
    return tok


def fix_pad_token(tok) -> None:
    """GPT-2 and many Llama tokenizers ship without a pad token; batching needs one."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})


def sharded_engine() -> Optional[str]:
    """"fsdp" or "zero3" when accelerate launched this process with parameter sharding, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return None


def quantization_config(args, skip_modules: tuple[str, ...] = ()):
    """A BitsAndBytesConfig for load_in_4bit / load_in_8bit, else None."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules) or None)
    extra = {}
    if sharded_engine():  # FSDP / ZeRO-3 shard flat tensors of one dtype: store the 4-bit weights in the compute dtype
        extra["bnb_4bit_quant_storage"] = _dtype(args.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=_dtype(args.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        **extra,
        # Heads stay full precision: they are trained fully and must survive save/merge.
        llm_int8_skip_modules=list(skip_modules) or None,
    )


def load_model(args, auto_class, training: bool = True, **model_kwargs):
    """Load the base model. Returns (model, newly_initialized_module_names)."""
    import torch

    path = resolve_model_path(args.model_name_or_path)
    check_weights_safe(path, args.allow_pickle)
    kw = dict(model_kwargs)
    kw["trust_remote_code"] = args.trust_remote_code
    kw["dtype"] = _dtype(args.dtype)
    kw["use_safetensors"] = None if args.allow_pickle else True
    if args.attn_implementation:
        kw["attn_implementation"] = args.attn_implementation
    qc = quantization_config(args, skip_modules=QUANT_SKIP)
    cuda = torch.cuda.is_available()
    if qc is not None:
        kw["quantization_config"] = qc
        if cuda:
            kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    cpu_quantized = qc is not None and not cuda
    try:
        with cpu_memory.lean_quantized_load(cpu_quantized):
            model, info = auto_class.from_pretrained(path, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise LoraFtError(f"model_name_or_path: cannot load '{args.model_name_or_path}' ({_first_line(e)})") from None
    if cpu_quantized:
        cpu_memory.release_checkpoint_mapping(model)
    if args.load_in_4bit and (training or args.use_dora):
        keep_standard_4bit_layout(model)
    if cpu_quantized and args.load_in_4bit and training:
        from .cpu import linear4bit as cpu_linear4bit  # imports torch: not at module level, `lora-ft --help` stays fast

        cpu_linear4bit.install(model)
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
    return model, new_modules


def keep_standard_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel (while training, and under DoRA).

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place at its first no-grad
    forward in eval mode, and keeps it packed. Two things then break silently:
    - training after an eval (eval_strategy epoch or steps): the packed layout's matmul has no backward, so the
      frozen weight stops passing gradient to the layer's input and every earlier layer trains on a wrong gradient;
    - DoRA: peft dequantizes the weight with `dequantize_4bit`, which ignores the packing, so every DoRA eval sees a
      garbage weight norm (measured: test accuracy 0.35 instead of 0.76 on the tweet classifier).
    Inference of plain 4-bit LoRA (predict, serve) keeps the fast packed kernel.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if layers:
        upstream.usable("keep_4bit_layout")  # nothing to fall back to: a changed bitsandbytes gets a warning
    for m in layers:
        m.support_avx512bf16_for_cpu = False


def _layout_switch_present():
    """bitsandbytes decides to repack from this attribute in Linear4bit.forward; renamed, setting it does nothing."""
    import bitsandbytes as bnb

    src = inspect.getsource(bnb.nn.Linear4bit.forward)
    return None if "support_avx512bf16_for_cpu" in src else "Linear4bit.forward no longer reads support_avx512bf16_for_cpu"


upstream.register(upstream.Patch("keep_4bit_layout", "bitsandbytes",
                                 "no 4-bit weight repacking while training (the packed kernel has no backward)",
                                 _layout_switch_present))


def new_top_modules(model, new_param_modules: list[str]) -> list[str]:
    """Module names (as peft's modules_to_save expects: a name suffix) whose weights were freshly initialized."""
    names = set()
    for full in new_param_modules:
        parts = full.split(".")
        # Heads live at the top (score, classifier) or one level down (bert.pooler.dense -> pooler).
        if parts[0] in HEAD_NAMES:
            names.add(parts[0])
        elif len(parts) >= 2:
            names.add(parts[1])
        else:
            names.add(parts[0])
    return sorted(names)


def lora_config(args, task_type: str, modules_to_save: list[str]):
    if not args.use_peft:
        return None
    from peft import LoraConfig

    targets = args.lora_target_modules or "all-linear"
    return LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        # Freshly initialised modules are trained fully, never adapted: LoRA on random weights learns nothing useful.
        exclude_modules=list(modules_to_save) or None,
        modules_to_save=list(modules_to_save) or None,  # peft appends to this list: hand it a copy
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        init_lora_weights=args.init_lora_weights,
        bias="none",
    )


def attach_peft(model, args, task_type: str, modules_to_save: list[str], gradient_checkpointing: bool = False,
                mixed_precision: bool = False):
    """Wrap `model` with LoRA (preparing a k-bit base first), or return it unchanged for full fine-tuning.
    mixed_precision: the trainer runs under bf16/fp16 autocast (trainable weights then go to fp32)."""
    if not args.use_peft:
        return model
    from peft import get_peft_model

    if args.load_in_4bit or args.load_in_8bit:
        model = prepare_kbit_model(model, gradient_checkpointing)
    if args.adapter_name_or_path:
        model = load_adapter_for_training(model, args.adapter_name_or_path)
    else:
        try:
            model = get_peft_model(model, lora_config(args, task_type, modules_to_save))
        except ValueError as e:  # peft's "Target modules {...} not found in the base model"
            raise LoraFtError(f"lora_target_modules: {_first_line(e)}; use module names of this model or all-linear") from None
    sharded = sharded_engine()
    if args.use_dora and not sharded:
        from .cpu import dora as cpu_dora  # imports torch: not at module level

        cpu_dora.install(model)  # peft's DoRA forms a dense W + sBA per layer per step: closed form on CPU
    # Without autocast a bf16 head copy must stay bf16: nothing would cast its bf16 input. Sharded (FSDP, ZeRO-3)
    # parameters are flat shards that must keep one dtype.
    if mixed_precision and not sharded:
        train_in_fp32(model)
    return model


def prepare_kbit_model(model, gradient_checkpointing: bool):
    """peft's k-bit preparation (frozen base, input grads, checkpointing), with weights loaded in bf16 kept in bf16.

    peft upcasts every fp16/bf16 weight that was not quantized to fp32, a guard for fp16's narrow range. bf16 has
    fp32's range, so with `dtype: bfloat16` the embeddings and norms stay bf16, and so does the residual stream:
    a SmolLM2-1.7B-shaped 4-bit model on CPU peaked 0.75 GB lower per step of 2 x 256 tokens.
    """
    import torch
    from peft import prepare_model_for_kbit_training

    # FSDP / ZeRO-3 QLoRA stores everything in one dtype (bnb_4bit_quant_storage): peft's preparation as it is there.
    bf16 = [] if sharded_engine() else [p for p in model.parameters() if p.dtype == torch.bfloat16]
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for p in bf16:
        p.data = p.data.to(torch.bfloat16)
    return model


def train_in_fp32(model) -> None:
    """Trainable weights in fp32 whatever `dtype` the base loaded in (under autocast, which casts their inputs):
    peft upcasts its LoRA weights, not the heads it copies for modules_to_save, and an optimizer stepping bf16
    weights loses small updates to rounding."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def load_adapter_for_training(model, adapter_path: str):
    from peft import PeftModel

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise LoraFtError(f"adapter_name_or_path: {adapter_path} has no adapter_config.json; pass a lora_ft run dir")
    return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
