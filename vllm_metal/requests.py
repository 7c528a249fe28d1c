"""Requests the runner cannot serve, refused one by one in vLLM's frontend (an HTTP
400 for that request) before they reach the engine, where an error in a step
would stop it for every client."""


def check_request(processed_inputs, params) -> None:
    from vllm.exceptions import VLLMValidationError

    for singleton in _singletons(processed_inputs):
        if singleton.get("type") == "embeds":
            raise VLLMValidationError(
                "vllm-metal takes prompts as text or token ids, not prompt embeddings",
                parameter="prompt_embeds",
            )
    if getattr(params, "thinking_token_budget", None) is not None:
        raise VLLMValidationError(
            "vllm-metal does not enforce thinking_token_budget: leave it out",
            parameter="thinking_token_budget",
        )


def _singletons(processed_inputs) -> list[dict]:
    if not isinstance(processed_inputs, dict):
        return []
    parts = [processed_inputs]
    for key in ("encoder_prompt", "decoder_prompt"):
        if isinstance(processed_inputs.get(key), dict):
            parts.append(processed_inputs[key])
    return parts
