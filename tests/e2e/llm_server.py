"""A scripted OpenAI Chat Completions server that runs as a pod (the project image's python).

``SCRIPT`` is run with ``python3 -c``: it listens on port 8080 and answers
``POST /<scenario>/v1/chat/completions`` by scenario, and prints one JSON line per request on
stdout (``kubectl logs`` reads them back): the scenario, the path, the Authorization header,
the model, when the request arrived and when it was answered (``time.time()`` on the node),
the status sent.

Scenarios (the diff to answer with comes from ``$DIFF``):

* ``throttle``  -- the first request 429 with ``Retry-After: $RETRY_AFTER``, then as ``ok``;
* ``malformed`` -- 200, an answer without any diff;
* ``broken``    -- 500, every time;
* any other (``ok``, ``fallback``, ...) -- 200, the diff in a fenced ``diff`` block, token
  usage 120/40.
"""

from __future__ import annotations

from typing import Any

PORT = 8080

SCRIPT = r"""
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIFF = os.environ["DIFF"]
RETRY_AFTER = os.environ.get("RETRY_AFTER", "3")
seen = {}
lock = threading.Lock()

def chat(content):
    return {"id": "chatcmpl-e2e", "object": "chat.completion", "model": "e2e-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        received = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        scenario = self.path.strip("/").split("/")[0]
        with lock:
            seen[scenario] = seen.get(scenario, 0) + 1
            n = seen[scenario]
        headers = {}
        if scenario == "throttle" and n == 1:
            status, reply = 429, {"error": {"message": "slow down"}}
            headers["Retry-After"] = RETRY_AFTER
        elif scenario == "malformed":
            status, reply = 200, chat("I would rather describe the change in words.")
        elif scenario == "broken":
            status, reply = 500, {"error": {"message": "internal error"}}
        else:
            status, reply = 200, chat("Here is the change:\n\n```diff\n" + DIFF + "```\n")
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        try:
            model = json.loads(body).get("model")
        except ValueError:
            model = None
        print(json.dumps({"scenario": scenario, "n": n, "path": self.path, "status": status,
                          "authorization": self.headers.get("Authorization"), "model": model,
                          "received": received, "answered": time.time()}), flush=True)

ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def server_pod(name: str, image: str, pull_policy: str, diff: str, retry_after: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "llm",
                    "image": image,
                    "imagePullPolicy": pull_policy,
                    "command": ["python3", "-u", "-c", SCRIPT],
                    "env": [
                        {"name": "DIFF", "value": diff},
                        {"name": "RETRY_AFTER", "value": str(retry_after)},
                    ],
                    "ports": [{"containerPort": PORT}],
                    "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
                    "resources": {"limits": {"cpu": "200m", "memory": "128Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
