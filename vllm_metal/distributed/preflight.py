"""What the launcher asks each host before starting a rank there (prints JSON):
its software versions, whether the model path exists, whether it owns the
address the hostfile gives it.

    python -m vllm_metal.distributed.preflight MODEL ADDRESS
"""

import json
import os
import socket
import sys


def host_report(model: str, address: str) -> dict:
    from vllm_metal.distributed.bootstrap import software_versions

    return {
        "versions": software_versions(),
        "model_found": os.path.exists(model),
        "owns_address": _owns(address),
        "hostname": socket.gethostname(),
    }


def _owns(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


if __name__ == "__main__":
    print(json.dumps(host_report(sys.argv[1], sys.argv[2])))
