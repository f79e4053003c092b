"""owl-serve: an OpenAI-compatible HTTP server over the continuous-batching engine
(`owl_jax.generate.slots`), with a chat page at /.

    app.py        the Starlette app: routes, streaming, errors
    protocol.py   /v1/chat/completions request checks -> a ChatRequest
    media.py      image_url parts (data: URLs; local files under an allowed directory)
    text.py       incremental detokenization and stop strings
    scheduler.py  the engine thread, the bounded waiting queue, cancellation
    metrics.py    Prometheus counters, gauges and the time-to-first-token histogram
    static/       the chat page (plain HTML and JavaScript)
"""
