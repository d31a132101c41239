"""Schemathesis hooks for tests/test_serve.py's fuzzing run (loaded with SCHEMATHESIS_HOOKS).

Every generated body is sent as generated, except the amount of work a completion asks for: at
its limits (16 prompts x 16 choices x 4096 tokens) one case would generate a million tokens. The
fields keep their generated types and values below the caps, so validation is fuzzed in full."""

import schemathesis

CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2}


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        for field, cap in CAPS.items():
            if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > cap:
                body[field] = cap
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 2 and isinstance(body["prompt"][0], list):
            body["prompt"] = body["prompt"][:2]
    return body
