"""What `chattune serve` is made of, one concern a module; `chattune.verbs.serve.run` is the spine.

    engine.py   what to serve: a run directory (base + adapter) or a merged model folder
    api.py      a chat-completions request checked against the limits; OpenAI-shaped errors
    worker.py   the one thread that owns the model, its bounded queue, streamed text pieces
    server.py   HTTP: routes, API key, body limits, JSON answers and server-sent events
"""
