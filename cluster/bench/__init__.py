"""``pdserve bench``: a streaming load generator for any OpenAI-compatible server.

Modules: workload (prompts, arrival schedules), client (one streamed request), runner (dispatch
with a rate and a concurrency cap), metrics (pure statistics), report (console, JSON, PNG) and
main (argparse + run). Nothing heavy is imported here, so ``pdserve --help`` stays fast.
"""
