"""The engine: the request queue, its calls and their life cycle, the worker processes that
run them and the messages between the two. No event loop and no file format in here."""
