"""Where a checkpoint lives: a local path as given, or a Hugging Face hub id resolved
through huggingface_hub's cache (downloaded when online), at the revision vLLM
resolved for its config and tokenizer.

With HF_HUB_OFFLINE=1 vLLM itself replaces a hub id by its cached snapshot
directory before the engine starts, so the loader sees a local path."""

from pathlib import Path

# config.json, the safetensors index and the weights; tokenizers stay vLLM's business
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors"]


class ModelNotFound(ValueError):
    pass


def checkpoint_dir(vllm_config) -> str:
    model, load = vllm_config.model_config, vllm_config.load_config
    return resolve_checkpoint(model.model, model.revision, load.download_dir, model.hf_token)


def resolve_checkpoint(model: str, revision: str | None = None, download_dir: str | None = None,
                       token: str | bool | None = None) -> str:
    if Path(model).exists():
        return model
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:
        path = snapshot_download(model, revision=revision, cache_dir=download_dir, token=token,
                                 allow_patterns=CHECKPOINT_PATTERNS, local_files_only=offline)
    except Exception as error:  # huggingface_hub's errors for ids, revisions, network, auth
        raise ModelNotFound(not_found_message(model, revision, download_dir, offline, error)) from error
    missing = missing_weights_message(path, model)
    if missing:
        raise ModelNotFound(missing)
    return path


def not_found_message(model: str, revision: str | None, download_dir: str | None,
                      offline: bool, error: Exception) -> str:
    from huggingface_hub import constants

    cache = download_dir or constants.HF_HUB_CACHE
    what = f"model {model!r}" + (f" at revision {str(revision)!r}" if revision else "")
    if offline:
        return (f"vllm-metal cannot find {what} in the Hugging Face cache ({cache}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it. Download it first "
                f"(hf download {model}), unset HF_HUB_OFFLINE, or pass a local directory.")
    return (f"vllm-metal cannot download {what}: {type(error).__name__}: {error}. Check the id "
            "and --revision, set HF_TOKEN for a gated or private model, or pass a local directory.")


def missing_weights_message(path: str, model: str) -> str | None:
    """A directory (a cached hub snapshot too) that holds a config but no weights."""
    from vllm_metal.models.gguf import resolve_gguf_file

    directory = Path(path)
    if not directory.is_dir() or resolve_gguf_file(directory) is not None:
        return None
    if any(directory.glob("model*.safetensors")):
        return None
    return (f"vllm-metal finds no model*.safetensors weights for {model!r} in {directory}. "
            "If it is a Hugging Face snapshot, only part of it is cached: download the model "
            f"(hf download {model}) or unset HF_HUB_OFFLINE.")
