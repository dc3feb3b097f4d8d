"""Constraints compiled in a child process, so that no schema, regex or grammar can stall the engine: a compile
blocks only the thread that asked for it (waiting on a pipe, the GIL released), is bounded in time, and one
that runs over its budget, or crashes xgrammar, takes down only the worker (a new one starts for the next
constraint). What comes back is xgrammar's serialized CompiledGrammar."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from pagedllm.errors import RequestRejectedError

logger = logging.getLogger(__name__)

START_SECONDS = 120.0  # a new worker imports xgrammar and reads the vocabulary (seconds on a loaded machine)
# JSON laid out as json.dumps(indent=2) does. With any whitespace allowed, SmolLM2 at temperature 0 answered
# an order schema with "{" and then newlines until max_tokens.
JSON_LAYOUT = {"any_whitespace": False, "indent": 2}


class GrammarWorker:
    """Compiles one constraint at a time for `tokenizer`, each within `timeout` seconds (the engine's
    `constraint_compile_timeout`); the engine's heartbeat never waits on a compile, only its request does."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], timeout: float) -> None:
        self._setup = (tokenizer, vocab_size, stop_token_ids)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._conn: Connection | None = None

    def compile(self, kind: str, source: str) -> str:
        """The serialized compiled grammar, or RequestRejectedError naming `structured_outputs.<kind>`."""
        with self._lock:
            self._start()
            self._send.send((kind, source))
            if not self._conn.poll(self.timeout):
                self._stop()
                raise RequestRejectedError(f"structured_outputs.{kind}", f"did not compile within {self.timeout:g} s; "
                                           "send a smaller or simpler constraint")
            try:
                status, result = self._conn.recv()
            except (EOFError, OSError):
                self._stop()
                raise RequestRejectedError(f"structured_outputs.{kind}", "the compiler failed on it") from None
        if status == "error":
            raise RequestRejectedError(f"structured_outputs.{kind}", f"does not compile ({result})")
        return result

    def _start(self) -> None:
        """A new worker: a plain child process (the engine process is a daemon, which multiprocessing does
        not let have children), spoken to over two pipes of its own, so that nothing a library prints to
        stdout gets in the way."""
        if self._process is not None and self._process.poll() is None:
            return
        from pagedllm.engine.engine_process import python_executable  # (it imports this module's importers)
        self._close()  # one that died on its own
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        self._process = subprocess.Popen([python_executable(), "-m", __name__, str(from_parent), str(to_parent)],
                                         pass_fds=(from_parent, to_parent), stdin=subprocess.DEVNULL)
        os.close(from_parent)
        os.close(to_parent)
        self._send, self._conn = Connection(to_child, readable=False), Connection(from_child, writable=False)
        try:
            self._send.send(self._setup)
            if self._conn.poll(START_SECONDS) and self._conn.recv()[0] == "ready":
                return
        except (EOFError, OSError):
            pass
        self._stop()
        raise RuntimeError(f"the grammar worker did not start within {START_SECONDS:g} s")

    def _stop(self) -> None:
        logger.warning("grammar worker stopped (a constraint over its compile budget, or a compiler crash)")
        self._close()

    def _close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._send.close()
            self._conn.close()
        self._process = self._send = self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _serve(conn: Connection, reply: Connection) -> None:
    import xgrammar as xgr
    tokenizer, vocab_size, stop_token_ids = conn.recv()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compile_kind = {"json": lambda s: compiler.compile_json_schema(s, **JSON_LAYOUT),
                    "json_object": lambda s: compiler.compile_json_schema(s, **JSON_LAYOUT),
                    "regex": compiler.compile_regex, "choice": compiler.compile_grammar,
                    "grammar": compiler.compile_grammar, "structural_tag": compiler.compile_structural_tag}
    reply.send(("ready", None))
    while True:
        try:
            kind, source = conn.recv()
        except (EOFError, OSError):  # the engine is gone
            return
        try:
            reply.send(("ok", compile_kind[kind](source).serialize_json()))
        except (RuntimeError, ValueError) as e:  # xgrammar's parse errors: "[time] file.cc:line: message"
            reply.send(("error", str(e).strip().splitlines()[0].split(": ", 1)[-1]))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
