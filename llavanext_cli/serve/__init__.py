"""`llava serve`: one warm model behind an OpenAI-compatible API and the native record routes (app.py), its worker
and queue (scheduler.py), the images a request may carry (media.py); and the CLI's side of `--server` (client.py).
Above the API, below the command line."""
