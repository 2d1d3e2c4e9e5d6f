"""The worker SDK: what a worker fleet imports.

```python
from worker import Worker

worker = Worker(project="acme", deployment="v42", concurrency=16)

@worker.workflow("summarize")              # a failed run is retried twice
async def summarize(ctx, payload): ...

@worker.workflow("charge", retries=5, backoff=2.0)
async def charge(ctx, payload):
    if payload["amount"] <= 0:
        raise NonRetryableError("nothing to charge")   # failed at once

await worker.run()          # or: python -m worker mymodule:worker
```
"""

from worker._context import ExecutionContext
from worker._delivery import Handler
from worker._retry import DEFAULT_RETRIES, Backoff, NonRetryableError, RetryPolicy
from worker._runner import DeadlineExceeded
from worker._settings import WorkerSettings
from worker._worker import Worker

__all__ = [
    "DEFAULT_RETRIES",
    "Backoff",
    "DeadlineExceeded",
    "ExecutionContext",
    "Handler",
    "NonRetryableError",
    "RetryPolicy",
    "Worker",
    "WorkerSettings",
]
