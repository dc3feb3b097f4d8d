"""What a neighbour on the network, or a web page in the operator's browser (it reaches localhost), can try
against a real `pagedllm serve`, with and without the admin key: every attempt refused, the server serving."""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedllm.launcher import ADMIN_HEADER, ADMIN_KEY_ENV, GRPC_ADMIN_HEADER, free_port
from pagedllm.serving.repository import write_llm
from pagedllm_client import Client
from tests.integration.conftest import answers_200, descendants, running_serve, tiny_engine, wait_for

pytestmark = pytest.mark.integration

KEY = "security-test-admin-key"
# Triton's admin endpoints beside model control: shared memory, tracing and logging
ADMIN_CALLS = [("get", "/v2/systemsharedmemory/status"), ("get", "/v2/cudasharedmemory/status"),
               ("get", "/v2/logging"), ("get", "/v2/trace/setting"), ("post", "/v2/repository/index")]
# Within the byte and rule budgets (30 KB, 1,001 rules), yet about 9 s of compiling on a small CPU
SLOW_GRAMMAR = ("root ::= r0\n" + "".join(f'r{i} ::= "t{i}" r{i + 1} | "u{i}"\n' for i in range(1000))
                + 'r1000 ::= "end"\n')


def listeners(ports: list[str]) -> set[str]:
    """The local addresses of the TCP sockets listening on `ports` (from /proc/net/tcp and tcp6)."""
    wanted, found = {int(p) for p in ports}, set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in wanted:
                raw = bytes.fromhex(address)  # 32-bit words, each in the machine's (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return found


def code_load(http: str, marker: Path, headers: dict | None = None) -> requests.Response:
    """The remote-code attempt: a new model whose model.py is sent in the load request."""
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    body = {"parameters": {"config": json.dumps({"backend": "python", "max_batch_size": 0}),
                           "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    return requests.post(f"http://{http}/v2/repository/models/probe/load", json=body, headers=headers or {},
                         timeout=60)


def still_answers(grpc: str) -> None:
    with Client(grpc, "llm") as client:
        assert client.generate(prompt="Hello", max_tokens=3, temperature=0.0).text is not None


def test_by_default_serve_listens_on_loopback_and_nothing_loads_or_administers(tmp_path, tiny_model_dir):
    """Also, no request takes it down: text too long for the model, a forged internal request, a constraint
    that compiles for too long and random bytes are each refused, naming the field, and other requests are
    served meanwhile."""
    tiny = tiny_model_dir("llama-tied")
    write_llm(tmp_path / "repo", "llm", {**tiny_engine(tiny), "constraint_compile_timeout": 2.0})
    with running_serve(tmp_path, tiny, env={ADMIN_KEY_ENV: ""}) as (serve, ports):
        assert listeners(ports) == {"127.0.0.1"}
        marker = tmp_path / "ran"
        refused = code_load(f"127.0.0.1:{ports[0]}", marker)
        assert refused.status_code == 403 and not marker.exists(), refused.text
        for method, path in ADMIN_CALLS:
            answer = getattr(requests, method)(f"http://127.0.0.1:{ports[0]}{path}", timeout=10)
            assert answer.status_code == 403, (path, answer.status_code, answer.text)
        admin = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        for call in (admin.get_model_repository_index, admin.get_system_shared_memory_status,
                     admin.get_trace_settings, admin.get_log_settings):
            with pytest.raises(InferenceServerException, match="restricted|PERMISSION_DENIED"):
                call()
        admin.close()
        assert "model control: none" in serve.log_path.read_text()

        generate = f"http://127.0.0.1:{ports[0]}/v2/models/llm/generate"
        post = lambda body: requests.post(generate, json=body, timeout=120)  # noqa: E731

        long_text = post({"text_input": "word " * 40_000})  # 200 KB: refused before it is tokenized
        assert long_text.status_code == 400 and "[invalid_argument field=text_input] 200000 bytes of text is more " \
            "than the model's max_model_len" in long_text.json()["error"], long_text.text
        forged = post({"request": json.dumps({"params": {}, "options": {"prompt_text": ["x"]}}), "input_ids": [1, 2]})
        assert forged.status_code == 400, forged.text
        assert "field=request] options.prompt_text must be a str" in forged.json()["error"]
        too_many_ids = post({"input_ids": [1] * 100_000})
        assert too_many_ids.status_code == 400, too_many_ids.text
        assert "field=input_ids] 100000 tokens is over" in too_many_ids.json()["error"]

        with ThreadPoolExecutor(1) as pool:  # a constraint compiling past its budget holds up no one else
            slow = pool.submit(post, {"text_input": "Hi", "sampling_parameters": json.dumps(
                {"structured_outputs": {"grammar": SLOW_GRAMMAR}, "max_tokens": 3})})
            time.sleep(0.5)  # its worker starting, then compiling: seconds
            quick = post({"text_input": "Hello", "sampling_parameters": json.dumps({"max_tokens": 3})})
            assert quick.status_code == 200 and not slow.done()
            refused = slow.result()
        assert refused.status_code == 400, refused.text
        assert "field=structured_outputs.grammar] did not compile within 2 s" in refused.text

        rng = random.Random(29)
        for _ in range(40):  # random bytes, and random JSON-ish bytes, at the generate endpoint
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            if rng.random() < 0.5:
                body = b'{"text_input": "' + body + b'"}'
            answer = requests.post(generate, data=body, timeout=60)
            # Triton 2.51's own JSON parser answers a malformed body with 500, before any model sees it
            unparsed = answer.status_code == 500 and "failed to parse the request JSON" in answer.text
            assert 400 <= answer.status_code < 500 or unparsed, (body, answer.status_code, answer.text)
        still_answers(f"127.0.0.1:{ports[1]}")


def test_explicit_model_control_without_a_key_is_refused_at_start():
    repo = Path("model_repository").resolve()
    done = subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", "--model-repository", str(repo),
                           "--model-control-mode", "explicit"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, ADMIN_KEY_ENV: ""})
    assert done.returncode != 0 and "--model-control-mode: explicit" in done.stderr and ADMIN_KEY_ENV in done.stderr


def test_with_the_key_only_its_holder_administers_and_the_gateway_is_ready(tmp_path, tiny_model_dir):
    port = free_port()
    with running_serve(tmp_path, tiny_model_dir("llama-tied"), "--openai-port", str(port),
                       env={ADMIN_KEY_ENV: KEY}) as (serve, ports):
        http = f"127.0.0.1:{ports[0]}"
        assert wait_for(lambda: answers_200(f"http://127.0.0.1:{port}/ready"), 60), serve.log_path.read_text()
        reply = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert reply.completions.create(model="llm", prompt="Hi", max_tokens=2).choices[0].text is not None
        marker = tmp_path / "ran"
        for headers in ({}, {ADMIN_HEADER: "wrong"}):
            assert code_load(http, marker, headers).status_code == 403 and not marker.exists()
            for method, path in ADMIN_CALLS:
                assert getattr(requests, method)(f"http://{http}{path}", headers=headers, timeout=10).status_code == 403
        allowed = requests.post(f"http://{http}/v2/repository/index", headers={ADMIN_HEADER: KEY}, timeout=10)
        assert allowed.status_code == 200 and {m["name"] for m in allowed.json()} == {"llm"}
        admin = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        assert admin.get_model_repository_index(headers={GRPC_ADMIN_HEADER: KEY}) is not None
        with pytest.raises(InferenceServerException, match="restricted"):
            admin.get_model_repository_index(headers={ADMIN_HEADER: KEY})  # HTTP's name is not gRPC's
        admin.close()
        still_answers(f"127.0.0.1:{ports[1]}")
        for pid in [serve.pid, *descendants(serve.pid)]:  # /proc/<pid>/cmdline: every user of the machine reads it
            assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            if Path(f"/proc/{pid}/comm").read_text().strip() != "tritonserver":  # its own environment is private
                assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes() or pid == serve.pid, pid

