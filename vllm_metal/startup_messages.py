"""Two user mistakes that vLLM reports before any platform hook can: a hub id
missing from the cache under HF_HUB_OFFLINE=1, and --distributed-executor-backend
ray without Ray. vLLM's own errors name neither the model nor the pinned extra;
this plugin's replace them.

Loaded through vLLM's ``vllm.general_plugins`` entry point, which vLLM calls in
``EngineArgs.__post_init__`` just before it resolves the model id, and only
active where this plugin's platform is the one vLLM will pick. The two vLLM
functions wrapped here are pinned by tests/test_vllm_contact.py."""

import functools


def install() -> None:
    import vllm_metal

    if vllm_metal.register() is None:
        return
    _explain_missing_hub_model()
    _explain_missing_ray()


def _explain_missing_hub_model() -> None:
    from vllm.engine import arg_utils

    resolve = arg_utils.get_model_path
    if getattr(resolve, "_vllm_metal", False):
        return

    @functools.wraps(resolve)
    def get_model_path(model, revision=None):
        from huggingface_hub.errors import LocalEntryNotFoundError

        from vllm_metal.models.hub import ModelNotFound, not_found_message

        try:
            return resolve(model, revision)
        except LocalEntryNotFoundError as error:
            raise ModelNotFound(not_found_message(str(model), revision, None, True, error)) \
                from error

    get_model_path._vllm_metal = True
    arg_utils.get_model_path = get_model_path


def _explain_missing_ray() -> None:
    from vllm.v1.executor import ray_utils

    if ray_utils.ray is not None or getattr(ray_utils.assert_ray_available, "_vllm_metal", False):
        return

    def assert_ray_available():
        from vllm_metal.distributed.ray_cluster import ray_missing_message

        raise ValueError(ray_missing_message())

    assert_ray_available._vllm_metal = True
    ray_utils.assert_ray_available = assert_ray_available
