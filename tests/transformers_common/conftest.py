# These are transformers' common test mixins, not tests of their own: collect nothing from this folder.
collect_ignore_glob = ["test_*.py"]
