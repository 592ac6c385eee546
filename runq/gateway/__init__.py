"""The FastAPI gateway: validates requests, admits them into the queue, waits for results."""
