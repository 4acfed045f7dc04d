"""An OpenAI-compatible HTTP server over the decoders (``medusa-llama serve``).

Layers, each replaceable: ``protocol`` (the wire format), ``app`` (FastAPI routes), ``scheduler`` (a queue and the
one worker thread that owns the model), ``engine`` (sequences and what advances them: today one sequence at a time
through ``decoder.generate``), ``text`` (prompt encoding, incremental detokenization, stop strings), ``server``
(uvicorn), ``config`` (the options). Everything but ``config`` needs the serve extra (fastapi, uvicorn), so nothing
is imported here.
"""
