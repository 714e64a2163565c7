"""`prealign serve`: an OpenAI-compatible HTTP server that enforces the mode policy.

`engine` (continuous batching on the device) and `chat` (the template) are the library;
here are the HTTP routes (`app`), the request bodies (`protocol`) and the process
(`server`: uvicorn on a socket, SIGTERM drains). Needs the `[serve]` extra.
"""
