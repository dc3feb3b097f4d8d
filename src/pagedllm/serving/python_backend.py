"""The few calls into Triton's Python backend (`triton_python_backend_utils`, which exists only inside
tritonserver's stub process, so it is imported when a model initializes). Everything else the models do
lives in modules that never import it and are unit-tested without a server."""
from __future__ import annotations

import functools
import json
import os
import select
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagedllm.errors import RequestError, for_triton


def backend() -> Any:
    import triton_python_backend_utils as pb_utils  # only inside tritonserver
    return pb_utils


# A stub follows its dead tritonserver this much later, so that `pagedllm serve` (supervisor.py), which restarts
# tritonserver when a stub died first and took it down, never sees these exits together with the server's.
FOLLOW_SERVER_SECONDS = 2.0


@functools.cache  # once per process, whichever model of the stub calls first
def exit_with_server(server_name: str = "tritonserver") -> None:
    """Ends this process FOLLOW_SERVER_SECONDS after its parent, tritonserver, exits (a pidfd turns readable),
    or at once where the parent is no longer tritonserver (it died while this stub started; init adopted it).
    Triton 2.51's stubs outlive a tritonserver that died of a broken pipe while they loaded: two stayed up for
    an hour, holding their memory, and the llm model's stub would hold its engine process too (which follows
    its stub)."""
    parent = os.getppid()
    try:
        if Path(f"/proc/{parent}/comm").read_text().strip() != server_name:
            os._exit(0)
        server = os.pidfd_open(parent)
    except OSError:  # gone between the reads
        os._exit(0)

    def watch() -> None:
        select.select([server], [], [])
        time.sleep(FOLLOW_SERVER_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="pagedllm-server-watch", daemon=True).start()


class PythonBackend:
    """Tensors in, responses out, for one model: what the model modules and `Streams` send through."""

    def __init__(self, args: dict[str, str]) -> None:
        exit_with_server()
        self.pb = backend()
        self.config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        self.final_flag = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def inputs(self, request: Any) -> dict[str, np.ndarray]:
        """The request's tensors by name (the optional ones it did not send are absent)."""
        found = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                found[name] = tensor.as_numpy()
        return found

    def response(self, tensors: dict[str, np.ndarray]) -> Any:
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(n, v) for n, v in tensors.items()])

    def error(self, error: RequestError) -> Any:
        status = getattr(self.pb.TritonError, error.code.triton_status)
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(for_triton(error), status))

    def parameter(self, key: str) -> str | None:
        """A `parameters { key: ... value: { string_value: ... } }` entry of config.pbtxt, if set."""
        return self.config.get("parameters", {}).get(key, {}).get("string_value") or None

    def log_info(self, message: str) -> None:
        self.pb.Logger.log_info(message)

    def log_error(self, message: str) -> None:
        self.pb.Logger.log_error(message)
