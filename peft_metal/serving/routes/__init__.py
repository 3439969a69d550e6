"""The HTTP routes, one `APIRouter` per group: `prompts` (create, status, cancel, delete), `completions` (incl.
streaming), `models`, and `operations` (/healthz, /metrics); `dependencies` holds what they share (the service, the API
key check). `app.create_app` includes them."""
