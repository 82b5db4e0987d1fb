"""The test suite. Test modules import shared code as ``tests.helpers`` and ``tests.reference``; pytest puts
the repository root on the import path (``pythonpath`` in pytest.ini)."""
