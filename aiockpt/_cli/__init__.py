"""The command line and its tools (demo, bench, sweep): outside the library's import graph;
nothing in the library imports this package."""
