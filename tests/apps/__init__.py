"""ASGI apps that tests run under uvicorn in separate processes (`tests.apps.<module>:app`)."""
