"""Reproduces a Triton 2.51 bug with no pagedllm code in the served model: a gRPC stream cancelled after its
final response can leak the model version. The version then never finishes unloading (finalize is never
called) and server shutdown runs into --exit-timeout-secs. It needs CPU load to show and is intermittent,
hence three copies of the cancelling model. HTTP streams, and gRPC streams closed without cancelling, are
not affected. This is not a test: the bug is Triton's and depends on timing.

    .venv/bin/python -m tests.support.repro_triton_cancel_leak
"""
from __future__ import annotations

import multiprocessing
import queue
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient

from pagedllm.launcher import ServerOptions, TritonServer, free_port

MODEL_PY = '''
import threading, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._run, args=(request.get_response_sender(),), daemon=True).start()

    def _run(self, sender):
        for i in range(20):
            time.sleep(0.005)
            out = pb_utils.Tensor("text_output", np.array([b"x"], dtype=np.object_))
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == 19 else 0
            sender.send(pb_utils.InferenceResponse([out]), flags=final)
'''
CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [1] }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [-1] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
'''
MODELS = {"cancel_after_final_1": True, "cancel_after_final_2": True, "cancel_after_final_3": True,
          "close_after_final": False}


def one_stream(url: str, model: str, cancel: bool) -> None:
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    try:
        client.async_stream_infer(model, [text], enable_empty_final_response=True)
        while not results.get(timeout=60)[0].get_response().parameters["triton_final_response"].bool_param:
            pass
    finally:
        client.stop_stream(cancel_requests=cancel)
        client.close()


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main(streams: int = 300) -> None:
    root = Path(tempfile.mkdtemp(prefix="cancel-leak-"))
    for name in MODELS:
        (root / "repo" / name / "1").mkdir(parents=True)
        (root / "repo" / name / "1" / "model.py").write_text(MODEL_PY)
        (root / "repo" / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    opts = ServerOptions(root / "repo", free_port(), free_port(), free_port(), "explicit", exit_timeout_secs=10,
                         admin_key="repro")
    server = TritonServer(opts, root / "tritonserver.log").start_ready(120)
    burners = [multiprocessing.Process(target=burn, args=(300,)) for _ in range(multiprocessing.cpu_count())]
    try:
        for b in burners:
            b.start()
        for name, cancel in MODELS.items():
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda _, name=name, cancel=cancel: one_stream(server.grpc_url, name, cancel),
                              range(streams)))
            requests.post(f"http://{server.http_url}/v2/repository/models/{name}/unload", timeout=60)
        time.sleep(15)
        index = requests.post(f"http://{server.http_url}/v2/repository/index", timeout=30).json()
        for m in index:
            print(f"{m['name']}: {m.get('state')} ({m.get('reason', '')})")  # UNLOADING = leaked
    finally:
        for b in burners:
            b.terminate()
        server.stop()
        print("server log:", server.log_path)


if __name__ == "__main__":
    main()
