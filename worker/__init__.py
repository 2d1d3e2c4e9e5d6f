"""The worker SDK: what a worker fleet imports.

```python
from worker import Worker

worker = Worker(project="acme", deployment="v42", concurrency=16)

@worker.workflow("summarize")
async def summarize(ctx, payload): ...

await worker.run()          # or: python -m worker mymodule:worker
```
"""

from worker._context import ExecutionContext
from worker._delivery import Handler
from worker._runner import DeadlineExceeded
from worker._settings import WorkerSettings
from worker._worker import Worker

__all__ = ["DeadlineExceeded", "ExecutionContext", "Handler", "Worker", "WorkerSettings"]
