"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): bundle uploads as bytes."""

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("application/gzip")
def gzip_body(ctx, value) -> bytes:
    # Random bytes, not a real archive: the server must refuse them with a 4xx.
    return serialize_binary(value)
