"""A bare Flask route returning a constant JSON document: the API-load baseline.

bench/run.py starts it under gunicorn with exactly the flags `retort api` uses
(service.cli.api_command), only the application differs. The documents are read
once at import from RETORT_BENCH_CONST_JSON (a file holding one JSON document
per job id): the same bytes the measured Retort route answers for that job, so
both serve a body of the same size.
"""

from __future__ import annotations

import json
import os

from flask import Flask

app = Flask("constapp")
app.json.sort_keys = False
_path = os.environ.get("RETORT_BENCH_CONST_JSON")
DOCUMENTS = {k: json.loads(v) for k, v in json.load(open(_path)).items()} if _path else {}


@app.get("/v1/jobs/<int:job_id>")
def job(job_id: int):
    return DOCUMENTS.get(str(job_id), {"ok": True})
