"""Running a job: the worker's side (claim, lease, sandbox, recording) and the runner's.

Data flows one way: claim -> lease -> sandbox -> runner (migrate) -> steps -> transitions.
The runner's modules (runner_main, migrate, protocol, plan) import nothing of
Retort's state side: they run in a sandboxed process that holds no secret but
its job's target URL. This package's __init__ imports nothing, so that the
runner imports runner_main without the worker side (see sandbox._BOOT).
"""
