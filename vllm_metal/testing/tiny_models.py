"""Tiny random-weight Hugging Face checkpoints for tests and benchmarks.

    python -m vllm_metal.testing.tiny_models --arch qwen3 --out DIR
    python -m vllm_metal.testing.tiny_models --arch qwen3 --out DIR \\
        --preset qwen3-0.6b --dtype bfloat16

Each checkpoint holds config.json, model.safetensors, generation_config.json and
a byte-level BPE tokenizer (ChatML template) trained here on a built-in corpus,
so nothing is downloaded. Same arch, seed and overrides give the same bytes.

Weights are N(0, 0.15) rather than the usual N(0, 0.02): at 0.02 attention in a
64-wide model is almost uniform, so the logits barely depend on token order
(a RoPE offset bug goes unnoticed); at 0.15 attention is sharp, greedy output
varies with the prompt, and transformers and mlx-lm float32 logits agree to
~1e-5 of their spread while the smallest top-1 gap over 16 greedy steps is
typically ~1e-2 of it. Gemma embeddings are drawn smaller (see
_embedding_init_scale), else every prompt decodes to one repeated token.
Compare against transformers with attn_implementation="eager": its sdpa path
skips Gemma 2's attention logit softcapping.
"""

import argparse
import contextlib
import functools
import json
import random
import struct
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 512
INITIALIZER_RANGE = 0.15

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    initializer_range=INITIALIZER_RANGE,
)


# Tokenizer

_NAMES = "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Lena Max Nora Oscar".split()
_PLACES = "London Paris Berlin Tokyo Cairo Lima Oslo Rome Madrid Sydney Boston".split()
_ADJECTIVES = (
    "small large quick slow bright dark happy quiet green blue old young warm "
    "cold gentle strong simple clever tired busy friendly curious heavy"
).split()
_NOUNS = (
    "cat dog bird river mountain garden house city teacher student computer "
    "model story book window morning evening question answer friend market "
    "train letter song idea problem system number table water forest road"
).split()
_VERBS = (
    "sees finds likes builds reads writes opens follows answers visits paints "
    "carries watches explains remembers changes helps moves learns brings"
).split()
_ADVERBS = "quickly slowly often never always carefully quietly happily again".split()
_TEMPLATES = [
    "The {adj} {noun} {verb} the {noun2}.",
    "{name} {verb} a {adj} {noun} in {place}.",
    "Why does the {noun} {verb_base} {adv}?",
    "In {place}, {name} {adv} {verb} {num} {noun}s.",
    '{name} said: "I think the {noun} is {adj}, but the {noun2} is not."',
    "Question: what {verb} the {adj} {noun}? Answer: {name} does.",
    "There are {num} {adj} {noun}s and {num2} {noun2}s near the {place} {noun}.",
    "def {noun}_{verb_base}(x):\n    return x * {num} + {num2}",
]


def _base_form(verb: str) -> str:
    return verb[:-2] if verb.endswith(("ches", "shes", "sses", "xes")) else verb[:-1]


def _sentence(rng: random.Random) -> str:
    verb = rng.choice(_VERBS)
    return rng.choice(_TEMPLATES).format(
        adj=rng.choice(_ADJECTIVES),
        noun=rng.choice(_NOUNS),
        noun2=rng.choice(_NOUNS),
        verb=verb,
        verb_base=_base_form(verb),
        adv=rng.choice(_ADVERBS),
        name=rng.choice(_NAMES),
        place=rng.choice(_PLACES),
        num=rng.randint(0, 99),
        num2=rng.randint(100, 2025),
    )


def tiny_corpus(num_lines: int = 120) -> list[str]:
    rng = random.Random(0)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(num_lines)]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    return tokenizer.to_str()


def tiny_tokenizer():
    """The trained `tokenizers.Tokenizer` (trained once per process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_SHAPE["max_position_embeddings"],
        "chat_template": CHATML_TEMPLATE,
    }


def write_tokenizer(out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json())
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    return out_dir


# Configs: one entry per architecture, on top of TINY_SHAPE.


def _llama():
    return dict(model_type="llama", rope_theta=10000.0)


def _qwen2():
    return dict(model_type="qwen2", rope_theta=1000000.0)


def _qwen3():
    return dict(model_type="qwen3", rope_theta=1000000.0)


def _mistral():
    return dict(model_type="mistral", rope_theta=10000.0, sliding_window=None)


def _gemma2():
    return dict(
        model_type="gemma2",
        rope_theta=10000.0,
        tie_word_embeddings=True,
        query_pre_attn_scalar=4,
        sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh",
    )


def _gemma3_text():
    return dict(
        model_type="gemma3_text",
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        tie_word_embeddings=True,
        query_pre_attn_scalar=4,
        sliding_window=4096,
        sliding_window_pattern=2,
        hidden_activation="gelu_pytorch_tanh",
    )


def _phi3():
    return dict(model_type="phi3", rope_theta=10000.0)


def _mixtral():
    return dict(
        model_type="mixtral",
        rope_theta=1000000.0,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _qwen3_moe():
    return dict(
        model_type="qwen3_moe",
        rope_theta=1000000.0,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
    )


def _deepseek_v3():
    """Multi-head latent attention (a compressed query too: ``q_lora_rank``; None
    projects queries directly), one dense layer, then routed experts in two groups
    of four (one group picked per token) plus a shared expert."""
    return dict(
        model_type="deepseek_v3",
        rope_theta=10000.0,
        num_hidden_layers=3,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=8,  # transformers' rotary width for this model: qk_rope_head_dim
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=32,
        routed_scaling_factor=2.5,
        num_mtp_layers=0,
    )


def _gpt_oss():
    """Attention sinks, a window of 8 on every other layer (from the first), YaRN
    RoPE as gpt-oss ships it (transformers' default), biased experts."""
    return dict(
        model_type="gpt_oss",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )


TINY_ARCHS = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}
SUPPORTED_TINY_ARCHS = list(TINY_ARCHS)

PRESETS = {
    "qwen3-0.6b": (
        "qwen3",
        dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            initializer_range=0.02,
        ),
    ),
    "llama-3-8b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            initializer_range=0.02,
        ),
    ),
}


def tiny_config_dict(arch: str, preset: str | None = None, **overrides) -> dict:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {SUPPORTED_TINY_ARCHS}")
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    return {
        **TINY_SHAPE,
        "vocab_size": tiny_tokenizer().get_vocab_size(),
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        **TINY_ARCHS[arch](),
        **_preset_overrides(arch, preset),
        **overrides,
    }


def _preset_overrides(arch: str, preset: str | None) -> dict:
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {list(PRESETS)}")
    preset_arch, overrides = PRESETS[preset]
    if preset_arch != arch:
        raise ValueError(f"preset {preset!r} is a {preset_arch} model, not {arch}")
    return overrides


def _hf_config(config: dict, dtype: str):
    from transformers import AutoConfig

    kwargs = dict(config)
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    hf_config.dtype = dtype
    return hf_config


def _legacy_config_keys(hf_config) -> dict:
    """Flat keys that hub checkpoints carry and mlx-lm reads."""
    rope = hf_config.rope_parameters
    keys = {"rope_theta": rope.get("full_attention", rope)["rope_theta"]}
    if hf_config.model_type == "gemma3_text":
        keys["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        keys["sliding_window_pattern"] = hf_config.layer_types.index("full_attention") + 1
    if hf_config.model_type == "qwen3_moe":
        keys["num_experts"] = hf_config.num_experts
    if rope.get("rope_type") == "yarn":
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return keys


# Weights


def _embedding_init_scale(hf_config) -> float:
    """Gemma multiplies embeddings by sqrt(hidden_size): undo that at init so the
    residual stream starts at the same scale as in the other archs."""
    return hf_config.hidden_size**-0.5 if hf_config.model_type.startswith("gemma") else 1.0


def _save_initialized_model(hf_config, out_dir: Path, dtype: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(_embedding_init_scale(hf_config))
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Zero at init; a spread makes routing depend on the correction too.
                tensor.normal_(0.0, 0.5)
        if hf_config.model_type == "gpt_oss":
            # Its projections and experts carry biases, zero at init: give them values.
            for name, tensor in model.named_parameters():
                if name.endswith("bias") and "router" not in name:
                    tensor.normal_(0.0, 0.1)
    model.to(getattr(torch, dtype))
    with _no_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)


def _meta_model(hf_config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _tensor_shapes(model) -> dict:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _random_tensor_chunks(name: str, shape, std: float, dtype, generator):
    """The tensor in row blocks of about 16M values, to bound peak memory."""
    import torch

    if name.endswith("norm.weight"):
        yield torch.ones(shape, dtype=dtype)
    elif name.endswith(".bias"):
        yield torch.zeros(shape, dtype=dtype)
    else:
        rows = max(1, (1 << 24) // _numel(shape[1:]))
        for start in range(0, shape[0], rows):
            block = (min(rows, shape[0] - start), *shape[1:])
            yield torch.empty(block).normal_(0.0, std, generator=generator).to(dtype)


_SAFETENSORS_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _safetensors_header(shapes: dict, dtype: str) -> bytes:
    tag, itemsize = _SAFETENSORS_DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        end = offset + itemsize * _numel(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _stream_random_weights(hf_config, out_dir: Path, dtype: str, seed: int):
    """Write model.safetensors one random tensor at a time, for big presets."""
    import torch

    model = _meta_model(hf_config)
    hf_config.architectures = [type(model).__name__]
    shapes = _tensor_shapes(model)
    header = _safetensors_header(shapes, dtype)
    generator = torch.Generator().manual_seed(seed)
    std, torch_dtype = hf_config.initializer_range, getattr(torch, dtype)
    with open(out_dir / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape in shapes.items():
            for chunk in _random_tensor_chunks(name, shape, std, torch_dtype, generator):
                f.write(chunk.view(torch.uint8).numpy().data)
    hf_config.save_pretrained(out_dir)


# Checkpoint


def write_tiny_model(
    arch: str,
    out_dir,
    *,
    dtype: str = "float32",
    seed: int = 0,
    preset: str | None = None,
    **config_overrides,
) -> Path:
    """Write a random-weight checkpoint of `arch` to `out_dir` and return it.

    `config_overrides` are transformers config fields (e.g. num_hidden_layers,
    tie_word_embeddings, initializer_range). `preset` names a real model shape
    from PRESETS; its weights are streamed straight to safetensors.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAFETENSORS_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = _hf_config(tiny_config_dict(arch, preset, **config_overrides), dtype)
    if preset:
        _stream_random_weights(hf_config, out_dir, dtype, seed)
    else:
        _save_initialized_model(hf_config, out_dir, dtype, seed)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    _write_json(config_path, {**config, **_legacy_config_keys(hf_config)})
    _write_generation_config(hf_config, out_dir)
    write_tokenizer(out_dir)
    return out_dir


def _write_generation_config(hf_config, out_dir: Path):
    ids = {k: getattr(hf_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out_dir / "generation_config.json", ids)


def _write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a tiny random-weight checkpoint.")
    parser.add_argument("--arch", required=True, choices=SUPPORTED_TINY_ARCHS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", choices=list(_SAFETENSORS_DTYPES))
    parser.add_argument("--preset", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_model(
        args.arch, args.out, dtype=args.dtype, seed=args.seed, preset=args.preset
    )
    print(path)


if __name__ == "__main__":
    main()


# LoRA adapters

LORA_MODULES = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def write_tiny_lora(model_dir, out_dir, *, seed: int = 0, rank: int = 4, alpha: int = 8,
                    modules=LORA_MODULES, std: float = 0.3) -> Path:
    """A PEFT LoRA adapter for the tiny checkpoint in ``model_dir``, as PEFT saves
    one (adapter_config.json, adapter_model.safetensors), with random A and B (PEFT
    starts B at zero, which would change nothing)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    shapes = {  # (out, in) of each projection
        "q_proj": (config["num_attention_heads"] * head_dim, hidden),
        "k_proj": (config["num_key_value_heads"] * head_dim, hidden),
        "v_proj": (config["num_key_value_heads"] * head_dim, hidden),
        "o_proj": (hidden, config["num_attention_heads"] * head_dim),
        "gate_proj": (config["intermediate_size"], hidden),
        "up_proj": (config["intermediate_size"], hidden),
        "down_proj": (hidden, config["intermediate_size"]),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in modules:
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            out_features, in_features = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = torch.empty(rank, in_features).normal_(
                0.0, std, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.empty(out_features, rank).normal_(
                0.0, std, generator=generator)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    _write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(modules), "bias": "none", "lora_dropout": 0.0,
        "base_model_name_or_path": str(model_dir),
    })
    return out_dir
