"""Turning image files into stored vectors: the incremental run, decode workers, engines,
core and batch policy, ``embed()``.

Named ``extraction`` (not ``extract``) so that the subpackage never shadows the public function
``embedkit.extract``.
"""
