"""The benchmark behind ``python -m fastmux bench``: a tool, not part of the library.

Nothing in fastmux imports this package; it imports fastmux only the way a
user does (``fastmux.Loop``, ``fastmux.Handler``), inside its server processes.

- ``cli``: the command -- options, the timed rounds, the syscall pass, the
  table, JSON and chart.
- ``servers``: the servers under test, one per process
  (``python -m fastmux.bench.servers NAME MODE CPU``).
- ``_loadgen``: the load generator and the minimal C server, built from
  ``csrc/loadgen/`` by ``_loadgen_build.py`` as a cffi module of its own, so
  the benchmark shares no code with the core it measures.
- ``tlsclient``: the load generator of the TLS scenarios (the stdlib ssl
  module over epoll; the C generator does not speak TLS) and the throwaway
  certificate the TLS servers use.
"""
