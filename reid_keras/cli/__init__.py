"""The commands: argument parsing over the library, one module per `python -m reid_keras.<command>`.

Library modules never import from here (tests/test_imports.py checks it).
"""
